"""The one wire codec: round trips, compatibility with nnInteractive 2.6's own packer and unpacker both ways,
streamed decoding, and refusal of anything malformed."""

import struct

import numpy as np
import pytest

from SlicerNNInteractiveLib import wire
from SlicerNNInteractiveLib.wire import ArrayDecoder, WireFormatError, pack_array, pack_chunks, unpack_array

official = pytest.importorskip("nnInteractive.inference.remote.serialization")

ARRAYS = [
    np.arange(2 * 5 * 6 * 7, dtype=np.int16).reshape(2, 5, 6, 7),
    (np.random.RandomState(0).rand(9, 8, 7) > 0.7).astype(np.uint8),
    np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100),
    np.ones((3, 4, 5), bool),
    np.arange(60, dtype=">i4").reshape(3, 4, 5),  # big-endian input goes out little-endian
]


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: "%s%s" % (a.dtype, a.shape))
@pytest.mark.parametrize("settings", [wire.IMAGE_CODEC, wire.LOOPBACK_IMAGE_CODEC, wire.MASK_CODEC,
                                      {"codec": "zstd", "clevel": 3, "filter": "bitshuffle"}])
def test_round_trip_and_official_compatibility(arr, settings):
    packed = pack_array(arr, **settings)
    assert np.array_equal(unpack_array(packed), arr)
    assert np.array_equal(official.unpack_array(packed), arr)  # the official server and client read ours
    assert np.array_equal(unpack_array(official.pack_array(np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="))))), arr)


def test_streamed_chunks_decode_from_pieces_of_any_size():
    arr = np.random.RandomState(1).randint(0, 2000, (1, 40, 50, 60)).astype(np.int16)
    pieces = list(pack_chunks(arr, chunk_bytes=10000, **wire.IMAGE_CODEC))
    assert len(pieces) == 1 + -(-arr.nbytes // 10000)
    body = b"".join(pieces)
    assert np.array_equal(official.unpack_array(body), arr)  # small chunks are still the official format
    for step in (1, 7, 4096, len(body)):
        dec = ArrayDecoder()
        for i in range(0, len(body), step):
            dec.feed(body[i:i + step])
        assert np.array_equal(dec.finish(), arr)


def test_empty_arrays():
    arr = np.zeros((3, 0, 4), np.uint8)
    assert unpack_array(pack_array(arr)).shape == (3, 0, 4)


def refused(body, *words):
    with pytest.raises(WireFormatError) as err:
        unpack_array(body)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_malformed_input_is_refused_with_a_reason():
    arr = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    good = pack_array(arr, **wire.IMAGE_CODEC)
    refused(b"", "truncated")
    refused(good[:10], "truncated")
    refused(good[:-5], "truncated")
    refused(b"XXXX" + good[4:], "magic")
    refused(good[:4] + b"\x02" + good[5:], "version")
    refused(good[:5] + b"\x09" + good[6:], "codec")
    refused(good + b"\x00", "trailing")
    head = struct.calcsize("<4sBBBB")
    name_len = good[head - 1]
    forged = bytearray(good)
    forged[head:head + name_len] = b"objec"[:name_len].ljust(name_len, b"t")
    refused(bytes(forged), "dtype")
    huge = bytearray(good)
    huge[head + name_len:head + name_len + 8] = (1 << 40).to_bytes(8, "little")
    refused(bytes(huge), "elements")
    negative = bytearray(good)
    negative[head + name_len:head + name_len + 8] = (-5).to_bytes(8, "little", signed=True)
    refused(bytes(negative), "negative")
    many = bytearray(good)
    nchunks_at = head + name_len + 8 * arr.ndim
    many[nchunks_at:nchunks_at + 4] = (10 ** 6).to_bytes(4, "little")
    refused(bytes(many), "chunks")
    corrupt = bytearray(good)
    corrupt[nchunks_at + 4 + 16:nchunks_at + 4 + 32] = b"\xff" * 16  # the blosc2 frame header
    refused(bytes(corrupt), "corrupted")
    wrong_len = bytearray(good)
    wrong_len[nchunks_at + 4:nchunks_at + 12] = (999).to_bytes(8, "little")  # raw length of the chunk
    refused(bytes(wrong_len))


def test_packing_refuses_what_cannot_be_sent():
    with pytest.raises(ValueError):
        pack_array(np.array([object()]))
    with pytest.raises(ValueError):
        pack_array(np.zeros(3), codec="snappy")
