"""Properties of the one wire codec, checked by hypothesis (bounded: a fixed number of derandomized examples each).

* Round trip: every allowed dtype, 1 to 5 dimensions (empty ones included), every codec and filter, any chunking,
  fed to the streaming decoder in pieces of any size, comes back bit for bit.
* Any byte string (random, or a valid packed array mutated: bytes flipped, header fields overwritten, cut, spliced)
  is either decoded exactly (the array is what its header declares, holding what its chunks decompress to, every
  byte consumed) or refused with ``WireFormatError`` (which the server answers with 400): never another exception,
  and the same outcome however the bytes are split into pieces.
* The decoder never allocates more than its declared limit (``max_elements`` times the item size) plus a copy of the
  input, measured with tracemalloc (which sees numpy's buffers); an ``accept`` hook that refuses a header is called
  before anything is allocated for the array.
"""

import struct
import tracemalloc

import blosc2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from SlicerNNInteractiveLib import wire
from SlicerNNInteractiveLib.wire import ArrayDecoder, WireFormatError, pack_array, pack_chunks, unpack_array

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT = 1 << 14  # max_elements given to the decoder under the memory properties
SLACK = 64 << 10  # bookkeeping: Python objects, struct results, exception text

dtypes = st.sampled_from(sorted(wire.ALLOWED_DTYPES)).map(np.dtype)
shapes = hnp.array_shapes(min_dims=1, max_dims=wire.MAX_NDIM, min_side=0, max_side=6)
codecs = st.fixed_dictionaries({"codec": st.sampled_from(sorted(wire.CODECS)),
                                "clevel": st.integers(0, 9),
                                "filter": st.sampled_from(sorted(wire.FILTERS))})


@st.composite
def arrays(draw):
    dtype, shape = draw(dtypes), draw(shapes)
    arr = draw(hnp.arrays(dtype, shape))  # floats include NaN, inf and signed zeros: compared bit for bit
    if draw(st.booleans()) and dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder(">"))  # big-endian input goes out little-endian
    return arr


@st.composite
def packed(draw, arr=None):
    """(array, its packed bytes) with any codec settings and chunk size."""
    arr = draw(arrays()) if arr is None else arr
    chunk = draw(st.sampled_from([wire.CHUNK_BYTES, 1, 7, 64, 1000]))
    return arr, b"".join(pack_chunks(arr, chunk_bytes=chunk, **draw(codecs)))


def splits(data):
    """Strategy: ``data`` cut into pieces at arbitrary points (empty pieces included)."""
    return st.lists(st.integers(0, len(data)), max_size=8).map(
        lambda cuts: [data[a:b] for a, b in zip([0] + sorted(cuts), sorted(cuts) + [len(data)])])


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a.shape == b.shape and a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
            and a.astype(a.dtype.newbyteorder("<")).tobytes() == b.astype(b.dtype.newbyteorder("<")).tobytes())


def decode(pieces, max_elements=wire.MAX_ELEMENTS, accept=None):
    decoder = ArrayDecoder(max_elements, accept)
    for piece in pieces:
        decoder.feed(piece)
    return decoder.finish()


def outcome(pieces, max_elements=wire.MAX_ELEMENTS):
    """("ok", array) or ("refused", None); any other exception escapes (and fails the property)."""
    try:
        return "ok", decode(pieces, max_elements)
    except WireFormatError:
        return "refused", None


def layout(buf):
    """What an accepted packed array says, read independently of ArrayDecoder: (dtype, shape, raw bytes of its
    chunks decompressed one by one, bytes consumed)."""
    magic, version, _codec, ndim, name_len = struct.unpack_from("<4sBBBB", buf, 0)
    at = 8
    dtype = np.dtype(bytes(buf[at:at + name_len]).decode("ascii"))
    at += name_len
    shape = struct.unpack_from("<%dq" % ndim, buf, at)
    at += 8 * ndim
    (nchunks,) = struct.unpack_from("<I", buf, at)
    at += 4
    raw = bytearray()
    for _ in range(nchunks):
        raw_len, packed_len = struct.unpack_from("<QQ", buf, at)
        at += 16
        piece = blosc2.decompress(bytes(buf[at:at + packed_len]))
        assert len(piece) == raw_len
        raw += piece
        at += packed_len
    return dtype, shape, bytes(raw), at


def assert_exact(arr, buf):
    dtype, shape, raw, consumed = layout(buf)
    assert arr.dtype == dtype and arr.shape == shape
    assert arr.tobytes() == raw
    assert consumed == len(buf)
    assert arr.nbytes == len(raw)


@st.composite
def mutated(draw):
    """A valid packed array with 1 to 4 mutations: anywhere, or aimed at the header's fields."""
    _, buf = draw(packed())
    buf = bytearray(buf)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "payload", "field", "cut", "insert", "delete", "splice"]))
        n = len(buf)
        if op in ("flip", "payload") and n:  # payload: the last third, mostly compressed data
            i = draw(st.integers(0 if op == "flip" else 2 * n // 3, n - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "field" and n:  # overwrite an integer near the front: ndim, dtype name, shape, chunk sizes
            i = draw(st.integers(0, min(n, 96) - 1))
            width = draw(st.sampled_from([1, 4, 8]))
            value = draw(st.one_of(st.integers(0, 8), st.integers(0, (1 << (8 * width)) - 1),
                                   st.sampled_from([(1 << (8 * width - 1)) - 1, (1 << (8 * width)) - 1])))
            buf[i:i + width] = value.to_bytes(width, "little")[: max(0, n - i)]
        elif op == "cut":
            del buf[draw(st.integers(0, n)):]
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i:i + draw(st.integers(1, 32))]
        elif op == "splice" and n:  # a part of the array repeated elsewhere (a chunk header, a whole chunk)
            i = draw(st.integers(0, n - 1))
            part = bytes(buf[i:i + draw(st.integers(1, 64))])
            j = draw(st.integers(0, n))
            buf[j:j] = part
    return bytes(buf)


def header(dtype, shape, nchunks):
    name = np.dtype(dtype).name.encode()
    return (wire.MAGIC + bytes([wire.VERSION, 2, len(shape), len(name)]) + name
            + struct.pack("<%dq" % len(shape), *shape) + struct.pack("<I", nchunks))


# ---------------------------------------------------------------- round trip


@BOUNDED
@given(packed(), st.data())
def test_round_trip_bit_for_bit_in_pieces_of_any_size(arr_body, data):
    arr, body = arr_body
    assert same_bits(unpack_array(body), arr)
    out = decode(data.draw(splits(body)))
    assert same_bits(out, arr)
    assert out.dtype.byteorder in "=|<"  # native little-endian, writable, C-contiguous: usable as is
    assert out.flags.c_contiguous and out.flags.writeable
    assert_exact(out, body)


def test_round_trip_covers_every_allowed_dtype_and_dimension_count():
    # hypothesis samples; this pins the corners so a dtype or ndim can never drop out unnoticed
    for name in sorted(wire.ALLOWED_DTYPES):
        for ndim in range(1, wire.MAX_NDIM + 1):
            arr = np.zeros((2,) * ndim, name)
            arr.flat[-1] = 1
            assert same_bits(unpack_array(pack_array(arr)), arr)


# ---------------------------------------------------------------- any bytes: decoded exactly or refused


def check_any_bytes(body, pieces):
    kind, arr = outcome([body])
    if kind == "ok":
        assert_exact(arr, body)
        assert same_bits(unpack_array(pack_array(arr)), arr)
    kind2, arr2 = outcome(pieces)  # the same outcome however the bytes arrive
    assert kind2 == kind
    if kind == "ok":
        assert same_bits(arr2, arr)
    return kind


@BOUNDED
@given(st.data())
def test_random_bytes_are_decoded_exactly_or_refused(data):
    body = data.draw(st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda tail: wire.MAGIC + tail),  # past the magic, into the header
        st.binary(max_size=200).map(lambda tail: wire.MAGIC + bytes([wire.VERSION, 2]) + tail)))
    check_any_bytes(body, data.draw(splits(body)))


@BOUNDED
@given(mutated(), st.data())
def test_mutated_arrays_are_decoded_exactly_or_refused(body, data):
    check_any_bytes(body, data.draw(splits(body)))


def test_mutations_reach_both_outcomes():
    """The mutated-bytes property means something only if mutations give both outcomes: count them."""
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated())
    def count(body):
        seen[outcome([body])[0]] += 1

    count()
    print("mutated packed arrays: %(ok)d decoded exactly, %(refused)d refused" % seen)
    assert seen["ok"] >= 5 and seen["refused"] >= 50, seen


# ---------------------------------------------------------------- memory: never more than the declared limit


def peak_while(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            result = fn()
        except WireFormatError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


huge_headers = st.builds(
    lambda dtype, shape, nchunks, tail: header(dtype, shape, nchunks) + tail,
    st.sampled_from(sorted(wire.ALLOWED_DTYPES)),
    st.lists(st.one_of(st.integers(0, 64), st.integers(0, (1 << 63) - 1)), min_size=1, max_size=wire.MAX_NDIM),
    st.one_of(st.integers(0, 4), st.integers(0, (1 << 32) - 1)),
    st.one_of(st.just(b""), st.binary(max_size=64),
              st.integers(1, 1 << 30).map(lambda n: struct.pack("<QQ", n, n))))


@BOUNDED
@given(st.one_of(huge_headers, mutated(), st.binary(max_size=300)), st.data())
def test_decoder_never_allocates_more_than_its_limit(body, data):
    pieces = data.draw(splits(body))
    result, peak = peak_while(lambda: decode(pieces, max_elements=LIMIT))
    assert peak <= LIMIT * 8 + 2 * len(body) + SLACK, (peak, len(body))
    if not isinstance(result, WireFormatError):
        assert result.size <= LIMIT


@BOUNDED
@given(huge_headers)
def test_accept_sees_the_header_before_anything_is_allocated(body):
    class Refused(Exception):
        pass

    seen = []

    def accept(shape, dtype):
        seen.append((shape, dtype))
        raise Refused()

    def run():
        try:
            return decode([body], accept=accept)  # the default limit: 8 G elements
        except Refused:
            return "refused by accept"

    result, peak = peak_while(run)
    assert peak <= 2 * len(body) + SLACK, peak  # whatever the header declares (up to 64 GB here)
    if result == "refused by accept":
        (shape, dtype), = seen
        count = int(np.prod(shape, dtype=object))
        assert count <= wire.MAX_ELEMENTS and dtype.name in wire.ALLOWED_DTYPES
    else:
        assert isinstance(result, WireFormatError) and not seen


def test_a_139_byte_bomb_allocates_nothing_beyond_the_limit():
    """The issue's example: a scribble body declaring 8 G elements, 139 bytes long."""
    bomb = header("uint8", (2048, 2048, 2048), 8) + struct.pack("<QQ", 1 << 30, 64) + b"\0" * 64
    result, peak = peak_while(lambda: decode([bomb], max_elements=256 ** 3))
    assert isinstance(result, WireFormatError) and "at most" in str(result)
    assert peak <= SLACK
    with pytest.raises(WireFormatError):
        unpack_array(bomb[:20])
