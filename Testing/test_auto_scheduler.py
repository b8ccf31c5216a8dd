"""Automatic runs and prompts on one real server process: the prompts of one session go before another session's
automatic run (which runs in pieces between them), the run stops between two pieces when its lease cancels it or its
client goes away (and nothing else can cancel it), and its working memory comes from the server's budget for as long
as it runs (413 when it can never fit, 503 + Retry-After while another run holds the budget, given back when it ends
or is cancelled).

Order is shown by what the server reports, never by a clock: a run's own position (``/x/queue``: its pieces done out
of those expected) when a prompt sent during it comes back, and the server's log line of a cancelled run.

Models: the quiet interactive model; automatic, tiny random nnU-Net models with a 32^3 patch (a 32 x 128 x 128 image
is 49 tiles): ``tiles`` (2 labels) and ``many`` (99 labels, whose export needs more than the budget).
"""

import json
import math
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest
import requests

import tiny_nnunet
from conftest import SERVER_ENV, TORCH_THREADS, free_port, running

from SlicerNNInteractiveLib import protocol as P
from SlicerNNInteractiveLib.client import RemoteSession

PATCH = (32, 32, 32)
SHAPE = (32, 128, 128)  # [k, j, i]: 1 x 7 x 7 tiles of 32^3
SMALL = (16, 40, 40)  # the prompting session's image
WAIT = 300.0  # generous bound of every wait: a failure, never a timing


def auto_image():
    rng = np.random.RandomState(0)
    return (rng.normal(100, 30, SHAPE)).astype(np.int16)[None]


def small_image():
    return (np.random.RandomState(1).normal(100, 30, SMALL)).astype(np.int16)[None]


def until(predicate, what):
    deadline = time.monotonic() + WAIT
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "never happened: %s" % what
        time.sleep(0.005)


def run_bytes(folder, shape, spacing=(1.0, 1.0, 1.0)):
    """What the server reserves for a run of the model in ``folder`` on an image of ``shape`` (the same code)."""
    from nninteractive_slicer_server.auto.predictors import LoadedPredictor

    return LoadedPredictor(folder, (0,), "checkpoint_final.pth", "cpu").working_bytes(shape, spacing)


def session_bytes(shape):
    from nninteractive_slicer_server.limits import session_bytes as held

    voxels = math.prod(shape[1:])
    return held(voxels, shape[0]) + voxels * 2  # + the int16 image kept for automatic models


@pytest.fixture(scope="module")
def world(tmp_path_factory, quiet_model):
    root = tmp_path_factory.mktemp("auto-scheduler")
    models = str(root / "models")
    tiles = tiny_nnunet.make_tiny_nnunet(models, patch_size=PATCH)
    many = tiny_nnunet.make_tiny_nnunet(models, labels=["l%d" % i for i in range(99)], patch_size=PATCH,
                                        dataset_name="Dataset997_Many")
    entries = [{"id": "tiles", "rel_path": "Dataset998_TinyOrgans", "name": "Tiles"},
               {"id": "many", "rel_path": "Dataset997_Many", "name": "Many labels"}]
    spec = tiny_nnunet.write_spec(str(root / "model-serve-spec.yaml"), models, entries)
    run = run_bytes(tiles, (1,) + SHAPE)
    # Room for two sessions with the big image, one prompting session and one run and a half: a second run at the same
    # time does not fit now (503), the 100-class model never does (413).
    budget = 2 * session_bytes((1,) + SHAPE) + session_bytes((1,) + SMALL) + run * 3 // 2
    assert run_bytes(many, (1,) + SHAPE) > budget
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    log = str(root / "server.log")
    cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", quiet_model, "--device", "cpu",
           "--port", str(port), "--torch-n-threads", TORCH_THREADS, "--max-sessions", "4", "--no-autozoom",
           "--model-serve-spec", spec, "--memory-budget", str(budget)]
    with running(cmd, url, log, env=SERVER_ENV):
        yield type("World", (), dict(url=url, log=log, budget=budget, run=run))


def session(world, image):
    s = RemoteSession(world.url)
    s.set_image(image, image_properties={"spacing": [1.0, 1.0, 1.0]})
    return s


def lease_post(world, s, path, **kw):
    return requests.post(world.url + path, headers={P.LEASE_HEADER: s._lease_token}, timeout=WAIT, **kw)


def position(world, s):
    r = requests.get(world.url + P.PATH_QUEUE, headers={P.LEASE_HEADER: s._lease_token}, timeout=WAIT)
    assert r.status_code == 200, r.text
    return r.json()


def reserved(world):
    return requests.get(world.url + P.PATH_SERVER_INFO, timeout=WAIT).json()["memory_reserved"]


class AutoRun(threading.Thread):
    """``POST /x/auto_segment`` of session ``s`` in a thread; ``response`` when it ends."""

    def __init__(self, world, s, model="tiles"):
        super().__init__(daemon=True)
        self.world, self.s, self.model = world, s, model
        self.response = None
        self.start()

    def run(self):
        self.response = lease_post(self.world, self.s, P.PATH_AUTO_SEGMENT, json={"model": self.model})

    def started(self):
        """Its position once it has run a piece (it is running and has pieces left)."""
        def seen():
            p = position(self.world, self.s)
            assert self.is_alive() or self.response.status_code == 200, self.response.text
            return p if p.get("pieces", {}).get("done", 0) >= 1 else None
        return until(seen, "the automatic run started")

    def result(self):
        self.join(WAIT)
        assert not self.is_alive()
        return self.response


def log_lines(world, words):
    with open(world.log) as f:
        return [line for line in f if all(w in line for w in words)]


def test_a_prompt_during_an_automatic_run_is_answered_before_the_run_ends(world):
    a, b = session(world, auto_image()), session(world, small_image())
    try:
        b.set_target_buffer(np.zeros(SMALL, np.uint8))
        run = AutoRun(world, a)
        first = run.started()
        assert first["running"] and first["pieces"]["expected"] >= 49 + 3
        b.add_point_interaction((8, 20, 20), include_interaction=True)  # a prompt, sent during the run
        after = position(world, a)  # the run's progress when the prompt's answer came
        assert run.is_alive(), "the run ended before the prompt sent during it was answered"
        assert after["running"] and after["pieces"]["done"] < after["pieces"]["expected"], after
        r = run.result()
        assert r.status_code == 200, r.text
        meta = json.loads(r.headers[P.META_HEADER])
        assert meta["image_shape"] == list(SHAPE) and meta["labels"]  # the run itself is intact
        assert "pieces" not in position(world, a)  # nothing of it left in the queue
    finally:
        a.close(wait=True)
        b.close(wait=True)


def test_its_lease_cancels_a_run_between_pieces_and_its_memory_is_given_back(world):
    a, b = session(world, auto_image()), session(world, auto_image())
    try:
        before = reserved(world)
        run = AutoRun(world, a)
        run.started()
        assert reserved(world) >= before + world.run  # the run's working memory, for as long as it runs
        r = lease_post(world, b, P.PATH_AUTO_CANCEL)  # another lease (the same user's) has no run to cancel
        assert r.status_code == 200 and r.json() == {"cancelled": False}
        r = requests.post(world.url + P.PATH_AUTO_CANCEL, timeout=WAIT)  # no lease at all
        assert r.status_code == 410
        assert run.is_alive()
        r = lease_post(world, a, P.PATH_AUTO_CANCEL)
        assert r.status_code == 200 and r.json() == {"cancelled": True}
        r = run.result()
        assert r.status_code == 409 and "cancelled by its client" in r.json()["detail"], r.text
        lines = log_lines(world, ["model 'tiles' cancelled (cancelled by its client) after"])
        done, expected = [int(w) for w in lines[-1].split("after ")[1].split(" pieces")[0].split(" of about ")]
        assert 1 <= done < expected
        assert reserved(world) == before
        assert lease_post(world, a, P.PATH_AUTO_CANCEL).json() == {"cancelled": False}  # nothing left to cancel
        bbox, region, labels, _ = a.auto_segment("tiles")  # the session carries on
        assert bbox is not None and labels
    finally:
        a.close(wait=True)
        b.close(wait=True)


def test_a_client_that_goes_away_cancels_its_run(world):
    a = session(world, auto_image())
    try:
        before = reserved(world)
        host, port = world.url.split("//")[1].split(":")
        body = json.dumps({"model": "tiles"}).encode()
        head = ("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s: %s\r\n\r\n"
                % (P.PATH_AUTO_SEGMENT, host, len(body), P.LEASE_HEADER, a._lease_token)).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            until(lambda: position(world, a).get("pieces", {}).get("done", 0) >= 1, "the run started")
        # the client is gone: the run stops at its next boundary and gives its memory back
        until(lambda: "pieces" not in position(world, a), "the run stopped")
        lines = log_lines(world, ["model 'tiles' cancelled (its client went away) after"])
        assert lines, "no cancellation in the server's log"
        done, expected = [int(w) for w in lines[-1].split("after ")[1].split(" pieces")[0].split(" of about ")]
        assert done < expected
        until(lambda: reserved(world) == before, "the run's memory was given back")
    finally:
        a.close(wait=True)


def test_a_run_takes_its_memory_from_the_budget(world):
    a, c = session(world, auto_image()), session(world, auto_image())
    try:
        r = lease_post(world, a, P.PATH_AUTO_SEGMENT, json={"model": "many"})  # 100 classes: never fits
        assert r.status_code == 413 and "--memory-budget" in r.json()["detail"], r.text
        run = AutoRun(world, a)
        run.started()
        r = lease_post(world, c, P.PATH_AUTO_SEGMENT, json={"model": "tiles"})  # fits, but not beside a's run
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        assert "try again later" in r.json()["detail"]
        assert lease_post(world, a, P.PATH_AUTO_CANCEL).json() == {"cancelled": True}
        assert run.result().status_code == 409
        bbox, _region, labels, _ = c.auto_segment("tiles")  # now it fits
        assert bbox is not None and labels
    finally:
        a.close(wait=True)
        c.close(wait=True)


def test_a_study_stops_when_cancelled_and_gives_its_memory_back(tmp_path):
    """``pipeline.run_study`` (what /infer, /infer_file and the jobs run) with a token: cancelled as its prediction
    starts, it stops there (RunCancelled, 409), writes no output of that stage, and its reservation is given back."""
    import SimpleITK as sitk

    from nninteractive_slicer_server.auto.pipeline import run_study
    from nninteractive_slicer_server.auto.predictors import AutoSegmenter
    from nninteractive_slicer_server.auto.registry import load_registry
    from nninteractive_slicer_server.cancel import CancelToken, RunCancelled
    from nninteractive_slicer_server.limits import MemoryBudget

    models = str(tmp_path / "models")
    tiny_nnunet.make_tiny_nnunet(models, patch_size=PATCH)
    registry = load_registry(tiny_nnunet.write_spec(str(tmp_path / "spec.yaml"), models))
    study = tmp_path / "study"
    study.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(auto_image()[0]), str(study / "ct.nii.gz"))
    budget = MemoryBudget(1 << 30)
    segmenter = AutoSegmenter(registry, device="cpu", budget=budget)
    request = {"nnunet_id": "tiny_organs", "study_path": str(study), "series_folders": ["ct.nii.gz"],
               "output_dir": str(tmp_path / "out")}
    token, heard = CancelToken(), []

    def progress(message):
        heard.append(message)
        if "predicting" in message:
            token.cancel("the job was deleted")

    with pytest.raises(RunCancelled, match="the job was deleted"):
        run_study(registry, segmenter, request, progress=progress, cancel=token)
    assert any("predicting" in m for m in heard) and not any("writing" in m for m in heard)
    assert not (tmp_path / "out" / "stage_0" / "prediction.nii.gz").exists()
    assert budget.used == 0
    done = run_study(registry, segmenter, request)  # the same segmenter carries on
    assert done["status"] == "done" and budget.used == 0
