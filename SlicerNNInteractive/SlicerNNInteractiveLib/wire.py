"""The one array codec of the project: nnInteractive 2.6's packed-array wire format.

Layout (all integers little-endian)::

    b"NNIA" | version u8 (=1) | codec u8 (1 zstd, 2 lz4) | ndim u8 | len(dtype name) u8 | dtype name (ascii)
    | shape: ndim x i64 | nchunks u32 | per chunk: raw length u64, compressed length u64, blosc2 chunk

Each chunk holds at most 1 GiB of raw bytes (blosc2 takes at most 2 GiB per call); a writer may use smaller
chunks, which lets a large array be compressed, sent and decompressed as a pipeline (``pack_chunks`` +
``ArrayDecoder``); the official unpacker reads any chunking. The blosc2
filter (shuffle, bitshuffle, none) is recorded inside each chunk, so a reader needs no extra field
and any filter we choose stays readable by the official client and server.

Everything in a packed array comes from the network, so ``ArrayDecoder`` (and ``unpack_array``) trusts nothing: dtypes come
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
# On loopback there is no link to save bytes on: compressing an L image costs 9-14 ms, storing it in 2 MB chunks
# (clevel 0, still a valid blosc2 chunk any unpacker reads) 2-7 ms, and its decompression is a memcpy. In one
# benchmark run: L upload +20.9 ms over in-process stored vs +29.0 ms compressed (noisy), a tie on smooth.
# RemoteSession uses it only for our server on this computer (see its _choose_image_codec).
LOOPBACK_IMAGE_CODEC = {"codec": "lz4", "clevel": 0, "filter": "none"}
MASK_CODEC = {"codec": "lz4", "clevel": 5, "filter": "none"}

_HEAD = struct.Struct("<4sBBBB")
_CHUNK_HEAD = struct.Struct("<QQ")


class WireFormatError(ValueError):
    """A packed array is malformed: truncated, corrupted, or declaring something we refuse."""


STREAM_CHUNK_BYTES = 2 << 20  # chunk size for streamed uploads: small enough to pipeline, large enough to compress
# blosc2's default of one thread per core costs ~0.1 ms of thread hand-off per call: more than compressing a
# returned region (0.014 ms on one thread) or decompressing it (0.004 ms). Measured on 2 cores, one thread was
# faster up to 4 MB chunks; larger ones keep blosc2's default.
SINGLE_THREAD_BELOW = 4 << 20


def _nthreads(nbytes, requested=None):
    if requested:
        return requested
    return 1 if nbytes < SINGLE_THREAD_BELOW else blosc2.nthreads


def pack_chunks(arr, codec="zstd", clevel=3, filter="shuffle", nthreads=None, chunk_bytes=CHUNK_BYTES):
    """Yield the packed wire format of ``arr`` piece by piece: the header, then each compressed chunk as soon as it
    is ready (so a caller can send one chunk while compressing the next)."""
    if codec not in CODECS:
        raise ValueError("unknown codec %r; use one of %s" % (codec, sorted(CODECS)))
    if filter not in FILTERS:
        raise ValueError("unknown filter %r; use one of %s" % (filter, sorted(FILTERS)))
    if not 0 < chunk_bytes <= CHUNK_BYTES:
        raise ValueError("chunk_bytes must be in 1..%d" % CHUNK_BYTES)
    arr = np.asarray(arr)
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise ValueError("dtype %s cannot be sent; use one of %s" % (arr.dtype, sorted(ALLOWED_DTYPES)))
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    itemsize = arr.dtype.itemsize
    chunk_bytes -= chunk_bytes % itemsize or 0  # whole elements per chunk (blosc2 mishandles partial ones)
    chunk_bytes = max(chunk_bytes, itemsize)
    codec_id, blosc_codec = CODECS[codec]
    name = arr.dtype.name.encode("ascii")
    raw = memoryview(arr.reshape(-1)).cast("B")
    starts = range(0, raw.nbytes, chunk_bytes)
    yield b"".join([_HEAD.pack(MAGIC, VERSION, codec_id, arr.ndim, len(name)), name,
                    struct.pack("<%dq" % arr.ndim, *arr.shape), struct.pack("<I", len(starts))])
    kwargs = {"typesize": itemsize, "codec": blosc_codec, "clevel": clevel, "filters": [FILTERS[filter]]}
    for start in starts:
        piece = raw[start : start + chunk_bytes]
        packed = blosc2.compress2(piece, nthreads=_nthreads(piece.nbytes, nthreads), **kwargs)
        yield _CHUNK_HEAD.pack(piece.nbytes, len(packed)) + packed


def pack_array(arr, codec="zstd", clevel=3, filter="shuffle", nthreads=None):
    """Serialize ``arr`` (any allowed dtype, C order) to the packed wire format, as one bytes object."""
    return b"".join(pack_chunks(arr, codec, clevel, filter, nthreads))


class ArrayDecoder:
    """Decode a packed array from pieces of any size as they arrive (``feed``), then ``finish()`` returns it.

    Each chunk is decompressed straight into the output as soon as it is complete, so decoding overlaps the
    transfer. Raises ``WireFormatError`` (with a readable reason) on anything malformed.

    ``accept(shape, dtype)``, when given, is called once the header is read and before the output is allocated: a
    receiver checks there what the array declares (against an image's shape, a size limit, a memory budget) and
    raises to refuse it. Its exceptions propagate unchanged.
    """

    def __init__(self, max_elements=MAX_ELEMENTS, accept=None):
        self._max_elements = max_elements
        self._accept = accept
        self._pieces = []  # received, not yet consumed (memoryviews; joined only when a chunk spans several)
        self._available = 0
        self._out = None  # flat output once the header is known
        self._out_bytes = None
        self._total = 0
        self._chunks_left = None
        self._written = 0
        self._shape = None

    def feed(self, data):
        data = memoryview(data).cast("B")
        if data.nbytes:
            self._pieces.append(data)
            self._available += data.nbytes
        if self._out is None and not self._read_header():
            return
        while self._chunks_left and self._read_chunk():
            pass
        if self._chunks_left == 0 and self._available:
            raise WireFormatError("packed array has %d unexpected trailing bytes" % self._available)

    def _peek(self, n):
        """The first ``n`` pending bytes as one buffer (copied only if they span pieces), or None if not there."""
        if self._available < n:
            return None
        first = self._pieces[0]
        if first.nbytes < n:
            joined = bytearray()
            while len(joined) < n:
                joined += self._pieces.pop(0)
            first = memoryview(joined)
            self._pieces.insert(0, first)
        return first[:n]

    def _consume(self, n):
        self._available -= n
        while n:
            first = self._pieces[0]
            if first.nbytes <= n:
                n -= first.nbytes
                self._pieces.pop(0)
            else:
                self._pieces[0] = first[n:]
                n = 0

    def finish(self):
        if self._out is None:
            if self._available < _HEAD.size:
                raise WireFormatError("packed array is truncated (%d bytes, the header alone needs %d)"
                                      % (self._available, _HEAD.size))
            raise WireFormatError("packed array is truncated inside its header")
        if self._chunks_left:
            head = self._peek(_CHUNK_HEAD.size)
            if head is None:
                raise WireFormatError("packed array is truncated (chunk header missing)")
            _, packed_len = _CHUNK_HEAD.unpack_from(head, 0)
            raise WireFormatError("packed array is truncated (a chunk needs %d bytes, %d remain)"
                                  % (packed_len, self._available - _CHUNK_HEAD.size))
        if self._written != self._total:
            raise WireFormatError("packed array holds %d bytes, its shape needs %d" % (self._written, self._total))
        return self._out.reshape(self._shape)

    def _read_header(self):
        buf = self._peek(_HEAD.size)
        if buf is None:
            return False
        magic, version, codec_id, ndim, name_len = _HEAD.unpack_from(buf, 0)
        if magic != MAGIC:
            raise WireFormatError("not a packed array (bad magic %r; expected %r)" % (bytes(magic), MAGIC))
        if version != VERSION:
            raise WireFormatError("packed array wire version %d is not supported (expected %d)" % (version, VERSION))
        if codec_id not in CODEC_NAMES:
            raise WireFormatError("packed array codec id %d is not supported" % codec_id)
        if not 1 <= ndim <= MAX_NDIM:
            raise WireFormatError("packed array has %d dimensions; 1 to %d are accepted" % (ndim, MAX_NDIM))
        size = _HEAD.size + name_len + 8 * ndim + 4
        buf = self._peek(size)
        if buf is None:
            return False
        try:
            name = bytes(buf[_HEAD.size : _HEAD.size + name_len]).decode("ascii")
        except UnicodeDecodeError:
            raise WireFormatError("packed array dtype name is not ASCII")
        if name not in ALLOWED_DTYPES:
            raise WireFormatError("packed array dtype %r is not accepted; use one of %s" % (name, sorted(ALLOWED_DTYPES)))
        dtype = np.dtype(name)
        shape = struct.unpack_from("<%dq" % ndim, buf, _HEAD.size + name_len)
        if any(d < 0 for d in shape):
            raise WireFormatError("packed array shape %s has a negative dimension" % (shape,))
        count = extent = 1
        for d in shape:
            count *= d
            extent *= max(d, 1)  # an empty array's other axes still bound it: numpy refuses (0, 2**40, 2**40)
        if extent > self._max_elements and count <= self._max_elements:
            raise WireFormatError("packed array shape %s is too large; at most %d elements are accepted"
                                  % (shape, self._max_elements))
        if count > self._max_elements:
            raise WireFormatError("packed array declares %d elements; at most %d are accepted"
                                  % (count, self._max_elements))
        (nchunks,) = struct.unpack_from("<I", buf, size - 4)
        total = count * dtype.itemsize
        if (total == 0) != (nchunks == 0) or nchunks > total:
            raise WireFormatError("packed array declares %d chunks for %d bytes" % (nchunks, total))
        if self._accept is not None:
            self._accept(shape, dtype)
        self._shape, self._total, self._chunks_left = shape, total, nchunks
        self._out = np.empty(count, dtype=dtype)
        self._out_bytes = memoryview(self._out).cast("B")
        self._consume(size)
        return True

    def _read_chunk(self):
        head = self._peek(_CHUNK_HEAD.size)
        if head is None:
            return False
        raw_len, packed_len = _CHUNK_HEAD.unpack_from(head, 0)
        if raw_len == 0 or raw_len > CHUNK_BYTES or self._written + raw_len > self._total:
            raise WireFormatError("packed array chunk of %d bytes does not fit its declared shape" % raw_len)
        if packed_len > raw_len + 4096:
            raise WireFormatError("packed array chunk claims %d compressed bytes for %d raw ones" % (packed_len, raw_len))
        end = _CHUNK_HEAD.size + packed_len
        buf = self._peek(end)
        if buf is None:
            return False
        chunk = buf[_CHUNK_HEAD.size :]
        try:
            frame_raw, frame_packed, _ = blosc2.get_cbuffer_sizes(chunk)
        except Exception as exc:  # blosc2 raises various types for garbage
            raise WireFormatError("packed array chunk is corrupted (%s)" % exc)
        if frame_raw != raw_len or frame_packed != packed_len:
            raise WireFormatError("packed array chunk is corrupted (its sizes disagree with the header)")
        try:
            blosc2.decompress2(chunk, dst=self._out_bytes[self._written : self._written + raw_len],
                               nthreads=_nthreads(raw_len))
        except Exception as exc:
            raise WireFormatError("packed array chunk could not be decompressed (%s)" % exc)
        self._written += raw_len
        self._chunks_left -= 1
        self._consume(end)
        return True


def unpack_array(buf, max_elements=MAX_ELEMENTS):
    """Inverse of ``pack_array``; raises ``WireFormatError`` with a readable reason on bad input."""
    decoder = ArrayDecoder(max_elements)
    decoder.feed(buf)
    return decoder.finish()
