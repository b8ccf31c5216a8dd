"""Bounded memory: what a request declares (body length, a packed array's shape and dtype) is checked before the
server allocates anything for it. Memory bombs get 4xx (or 503 + Retry-After while other sessions hold the budget)
with the limit and the asked size, and the server process barely grows: its RSS growth per bomb is printed (-s)."""

import json
import struct
import time

import numpy as np
import pytest
import requests

from conftest import claim, our_server, post

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.wire import pack_array

MiB = 1 << 20
BUDGET = 64 * MiB
FLAGS = ("--no-autozoom", "--max-sessions", "2", "--memory-budget", "64M", "--max-image-voxels", "3M",
         "--max-body-bytes", "8M")
SHAPE = (128, 128, 128)  # 2.1 M voxels: a session holding it reserves ~38 MB of the 64 MB budget
GROWTH_BOUND = 48 * MiB  # what a bomb may add to the server's RSS (the allocator keeps some of what it touched)


@pytest.fixture(scope="module")
def server(quiet_model, tmp_path_factory):
    with our_server(quiet_model, tmp_path_factory.mktemp("limits"), *FLAGS) as (url, proc):
        yield url, proc.pid


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024


def header(dtype, shape, nchunks):
    name = np.dtype(dtype).name.encode()
    return (b"NNIA" + bytes([1, 2, len(shape), len(name)]) + name + struct.pack("<%dq" % len(shape), *shape)
            + struct.pack("<I", nchunks))


def image(seed=1):
    return (np.random.RandomState(seed).normal(100, 20, SHAPE).astype(np.int16) + 1)[None]


def set_image(url, lease, seed=1):
    return post(url, lease, P.PATH_SET_IMAGE, pack_array(image(seed), codec="lz4", clevel=1), meta={})


def test_memory_bombs_are_refused_before_allocation(server):
    url, pid = server
    lease = claim(url)
    assert set_image(url, lease).status_code == 200
    assert post(url, lease, P.PATH_SET_TARGET_BUFFER, json.dumps({"shape": list(SHAPE), "dtype": "uint8"})
                ).status_code == 200
    flags = {"include_interaction": True, "run_prediction": True}
    huge = (2048, 2048, 2048)  # 8 G elements: the codec's own ceiling
    scribble = header("uint8", huge, 8) + struct.pack("<QQ", 1 << 30, 64) + b"\0" * 64
    float64_image = header("float64", (1, 150, 150, 133), 1)  # 3 M voxels (allowed) but 78 MB > 64 MB budget

    def chunked_oversize():  # no Content-Length: counted as it arrives (float64 128^3 = 16 MB in one chunk)
        yield header("float64", (1,) + SHAPE, 1) + struct.pack("<QQ", 16 * MiB, 16 * MiB)
        for _ in range(9):
            yield b"\1" * MiB

    bombs = [  # name, path, body, meta, expected status, words the answer must hold
        ("scribble declaring 8 G elements", P.PATH_ADD_SCRIBBLE, scribble, flags, 400, ["does not match", "2048"]),
        ("initial seg declaring 8 G elements", P.PATH_ADD_INITIAL_SEG, scribble, {}, 400, ["does not match"]),
        ("lasso chunk claiming 1 TB compressed", P.PATH_ADD_LASSO,
         header("uint8", SHAPE, 1) + struct.pack("<QQ", 2 * MiB, 1 << 40), flags, 400, ["compressed bytes"]),
        ("image of 8 G voxels", P.PATH_SET_IMAGE, header("int16", (1,) + huge, 16), {}, 413,
         ["3145728", "8589934592", "--max-image-voxels"]),
        ("image over the memory budget", P.PATH_SET_IMAGE, float64_image, {}, 413, [str(BUDGET), "--memory-budget"]),
        ("9 MB body with Content-Length", P.PATH_SET_IMAGE, b"\0" * (9 * MiB), {}, 413,
         [str(8 * MiB), str(9 * MiB), "--max-body-bytes"]),
        ("9 MB chunked body", P.PATH_SET_IMAGE, chunked_oversize, {}, 413, [str(8 * MiB), "--max-body-bytes"]),
        ("1 MB JSON point", P.PATH_ADD_POINT, json.dumps({"coordinates": [1, 2, 3], "include_interaction": True,
                                                          "pad": "x" * MiB}), None, 413, ["65536"]),
    ]
    for name, path, body, meta, status, words in bombs:
        before = rss(pid)
        r = post(url, lease, path, body() if callable(body) else body, meta=meta)
        grown = rss(pid) - before
        print("bomb %-40s %7s bytes sent -> HTTP %d, server RSS %+.1f MB" % (
            name, "stream" if callable(body) else len(body), r.status_code, grown / MiB))
        assert r.status_code == status, (name, r.status_code, r.text)
        for w in words:
            assert w in r.json()["detail"], (name, w, r.json()["detail"])
        assert grown < GROWTH_BOUND, (name, grown)
    assert len(scribble) < 160
    # the session is untouched and still answers prompts
    r = post(url, lease, P.PATH_ADD_POINT, json.dumps({"coordinates": [60, 60, 60], "include_interaction": True}))
    assert r.status_code == 200, r.text
    post(url, lease, P.PATH_RELEASE)


def test_budget_momentarily_full_is_503_with_retry_after_until_memory_is_freed(server):
    url, _ = server
    a, b = claim(url), claim(url)
    assert set_image(url, a).status_code == 200  # holds ~38 MB of 64
    r = set_image(url, b, seed=2)  # would need ~42 MB more
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    assert "64" in r.json()["detail"] or str(BUDGET) in r.json()["detail"]
    info = requests.get(url + P.PATH_SERVER_INFO).json()
    assert info["memory_budget"] == BUDGET and 0 < info["memory_reserved"] <= BUDGET
    post(url, a, P.PATH_RELEASE)  # its session is freed in the background, then its memory returns to the budget
    for _ in range(100):
        r = set_image(url, b, seed=2)
        if r.status_code != 503:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    post(url, b, P.PATH_RELEASE)
