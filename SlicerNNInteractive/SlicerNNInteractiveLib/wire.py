"""The one array codec of the project: nnInteractive 2.6's packed-array wire format.

Layout (all integers little-endian)::

    b"NNIA" | version u8 (=1) | codec u8 (1 zstd, 2 lz4) | ndim u8 | len(dtype name) u8 | dtype name (ascii)
    | shape: ndim x i64 | nchunks u32 | per chunk: raw length u64, compressed length u64, blosc2 chunk

Each chunk holds at most 1 GiB of raw bytes (blosc2 takes at most 2 GiB per call). The blosc2
filter (shuffle, bitshuffle, none) is recorded inside each chunk, so a reader needs no extra field
and any filter we choose stays readable by the official client and server.

Everything in a packed array comes from the network, so ``unpack_array`` trusts nothing: dtypes come
from an allowlist, ndim and shape are bounded before anything is allocated, and every chunk must
decompress to exactly the bytes the header declares. Any violation raises ``WireFormatError``.

Used by both our server and our client (imports numpy and blosc2 only).
"""

import struct

import blosc2
import numpy as np

MAGIC = b"NNIA"
VERSION = 1
CODECS = {"zstd": (1, blosc2.Codec.ZSTD), "lz4": (2, blosc2.Codec.LZ4)}
CODEC_NAMES = {ident: name for name, (ident, _) in CODECS.items()}
FILTERS = {
    "none": blosc2.Filter.NOFILTER,
    "shuffle": blosc2.Filter.SHUFFLE,
    "bitshuffle": blosc2.Filter.BITSHUFFLE,
}
ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"]
)
MAX_NDIM = 5
MAX_ELEMENTS = 1 << 33  # 8 G elements: far beyond any real volume, small enough to refuse absurd headers
CHUNK_BYTES = 1 << 30

# Defaults measured in Testing/benchmark (RESULTS.md there), L phantom 256x256x130 int16, 2 cores, one run:
# images: lz4 clevel 5 + shuffle had the lowest pack + unpack + 1 GbE transfer on smooth images (46.6 ms, 5.0x)
# and within 3 % of the best on noisy ones (95.6 ms, 1.8x); bitshuffle packs no faster but unpacks 1.3-1.7x slower
# (the server's side), zstd 2-3x slower for 1.2-2.4x smaller. Masks (binary, mostly zero; returned regions and
# full-volume scribbles): lz4 clevel 5 without a filter, 1.0 ms / 1.9 ms round trip incl. 1 GbE.
IMAGE_CODEC = {"codec": "lz4", "clevel": 5, "filter": "shuffle"}
MASK_CODEC = {"codec": "lz4", "clevel": 5, "filter": "none"}

_HEAD = struct.Struct("<4sBBBB")
_CHUNK_HEAD = struct.Struct("<QQ")


class WireFormatError(ValueError):
    """A packed array is malformed: truncated, corrupted, or declaring something we refuse."""


def pack_array(arr, codec="zstd", clevel=3, filter="shuffle", nthreads=None):
    """Serialize ``arr`` (any allowed dtype, C order) to the packed wire format."""
    if codec not in CODECS:
        raise ValueError("unknown codec %r; use one of %s" % (codec, sorted(CODECS)))
    if filter not in FILTERS:
        raise ValueError("unknown filter %r; use one of %s" % (filter, sorted(FILTERS)))
    arr = np.asarray(arr)
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise ValueError("dtype %s cannot be sent; use one of %s" % (arr.dtype, sorted(ALLOWED_DTYPES)))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    codec_id, blosc_codec = CODECS[codec]
    name = arr.dtype.name.encode("ascii")
    parts = [
        _HEAD.pack(MAGIC, VERSION, codec_id, arr.ndim, len(name)),
        name,
        struct.pack("<%dq" % arr.ndim, *arr.shape),
    ]
    raw = memoryview(arr.reshape(-1)).cast("B")
    chunks = range(0, raw.nbytes, CHUNK_BYTES)
    parts.append(struct.pack("<I", len(chunks)))
    kwargs = {"typesize": arr.dtype.itemsize, "codec": blosc_codec, "clevel": clevel, "filters": [FILTERS[filter]]}
    if nthreads:
        kwargs["nthreads"] = nthreads
    for start in chunks:
        piece = raw[start : start + CHUNK_BYTES]
        packed = blosc2.compress2(piece, **kwargs)
        parts.append(_CHUNK_HEAD.pack(piece.nbytes, len(packed)))
        parts.append(packed)
    return b"".join(parts)


def unpack_array(buf, max_elements=MAX_ELEMENTS):
    """Inverse of ``pack_array``; raises ``WireFormatError`` with a readable reason on bad input."""
    view = memoryview(buf).cast("B")
    if view.nbytes < _HEAD.size:
        raise WireFormatError("packed array is truncated (%d bytes, the header alone needs %d)" % (view.nbytes, _HEAD.size))
    magic, version, codec_id, ndim, name_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireFormatError("not a packed array (bad magic %r; expected %r)" % (bytes(magic), MAGIC))
    if version != VERSION:
        raise WireFormatError("packed array wire version %d is not supported (expected %d)" % (version, VERSION))
    if codec_id not in CODEC_NAMES:
        raise WireFormatError("packed array codec id %d is not supported" % codec_id)
    if not 1 <= ndim <= MAX_NDIM:
        raise WireFormatError("packed array has %d dimensions; 1 to %d are accepted" % (ndim, MAX_NDIM))
    offset = _HEAD.size
    needed = offset + name_len + 8 * ndim + 4
    if view.nbytes < needed:
        raise WireFormatError("packed array is truncated inside its header")
    try:
        name = bytes(view[offset : offset + name_len]).decode("ascii")
    except UnicodeDecodeError:
        raise WireFormatError("packed array dtype name is not ASCII")
    if name not in ALLOWED_DTYPES:
        raise WireFormatError("packed array dtype %r is not accepted; use one of %s" % (name, sorted(ALLOWED_DTYPES)))
    dtype = np.dtype(name)
    offset += name_len
    shape = struct.unpack_from("<%dq" % ndim, view, offset)
    offset += 8 * ndim
    if any(d < 0 for d in shape):
        raise WireFormatError("packed array shape %s has a negative dimension" % (shape,))
    count = 1
    for d in shape:
        count *= d
    if count > max_elements:
        raise WireFormatError("packed array declares %d elements; at most %d are accepted" % (count, max_elements))
    total = count * dtype.itemsize
    (nchunks,) = struct.unpack_from("<I", view, offset)
    offset += 4
    if nchunks != -(-total // CHUNK_BYTES):
        raise WireFormatError("packed array declares %d chunks for %d bytes" % (nchunks, total))
    out = np.empty(count, dtype=dtype)
    out_bytes = memoryview(out).cast("B")
    written = 0
    for _ in range(nchunks):
        if view.nbytes < offset + _CHUNK_HEAD.size:
            raise WireFormatError("packed array is truncated (chunk header missing)")
        raw_len, packed_len = _CHUNK_HEAD.unpack_from(view, offset)
        offset += _CHUNK_HEAD.size
        if raw_len > CHUNK_BYTES or written + raw_len > total:
            raise WireFormatError("packed array chunk is larger than its declared shape")
        if view.nbytes < offset + packed_len:
            raise WireFormatError(
                "packed array is truncated (a chunk needs %d bytes, %d remain)" % (packed_len, view.nbytes - offset)
            )
        chunk = view[offset : offset + packed_len]
        try:
            frame_raw, frame_packed, _ = blosc2.get_cbuffer_sizes(chunk)
        except Exception as exc:  # blosc2 raises various types for garbage
            raise WireFormatError("packed array chunk is corrupted (%s)" % exc)
        if frame_raw != raw_len or frame_packed != packed_len:
            raise WireFormatError("packed array chunk is corrupted (its sizes disagree with the header)")
        if raw_len:
            try:
                blosc2.decompress2(chunk, dst=out_bytes[written : written + raw_len])
            except Exception as exc:
                raise WireFormatError("packed array chunk could not be decompressed (%s)" % exc)
        written += raw_len
        offset += packed_len
    if written != total:
        raise WireFormatError("packed array holds %d bytes, its shape needs %d" % (written, total))
    if offset != view.nbytes:
        raise WireFormatError("packed array has %d unexpected trailing bytes" % (view.nbytes - offset))
    return out.reshape(shape)
