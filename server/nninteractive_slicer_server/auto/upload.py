"""Receiving an uploaded study (``POST /infer_file``, ``POST /jobs`` with multipart/form-data): the body is parsed as
it arrives; its ``file`` part goes straight into a spool file under the jobs folder (never the system's temporary
folder, never whole into memory) and its text fields (``request``) stay small in memory. While it arrives:

* the whole body stays within ``--max-upload-bytes`` (413), counted as received, whatever Content-Length said;
* before any byte is read, a job must be possible for this user (``JobStore.check_admission``: their jobs and
  bytes, all jobs; 429 / 413 / 503), so a client that cannot get one sends nothing;
* the file's bytes count against the user's share of the jobs folder (``JobStore.receiving``: 413 / 429);
* a client that sends nothing for the liveness timeout gets 408 (``deps._pieces``), one that goes away ends it;
* at most ``MAX_FIELDS`` parts of at most ``max_json_bytes`` each beside the file, headers bounded.

Nothing of a refused upload stays on disk. No job exists yet: the route makes one once the upload has arrived and
its request has been checked.
"""

import asyncio
import os

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..deps import _pieces
from ..validate import BadInput

FILE_FIELD, REQUEST_FIELD = "file", "request"
MAX_FIELDS = 8
FEED_BYTES = 1 << 20  # received bytes handed to the writing thread at a time (what an upload holds in memory)
NEEDS = ("send the study as a zip or tar archive in the multipart/form-data field 'file' (and the request JSON in "
         "the field 'request')")


class Upload:
    """A received upload: ``path`` (the spool file), ``size`` (its bytes), ``fields`` (text parts by name) and the
    ``receipt`` that counts it against its user's share until a job takes it over."""

    def __init__(self, path, size, fields, receipt):
        self.path, self.size, self.fields, self.receipt = path, size, fields, receipt


class _Parts:
    """python-multipart's callbacks: the file part into ``out``, the others into ``fields``."""

    def __init__(self, out, max_field_bytes):
        self.out, self.max_field_bytes = out, max_field_bytes
        self.fields, self.file_bytes, self.written = {}, 0, 0
        self.has_file = self.ended = False
        self._header, self._value, self._headers = b"", b"", {}
        self._name, self._chunks, self._size = None, [], 0

    def callbacks(self):
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self):
        self._headers, self._header, self._value, self._name = {}, b"", b"", None

    def header_field(self, data, start, end):
        self._header += data[start:end]

    def header_value(self, data, start, end):
        self._value += data[start:end]

    def header_end(self):
        self._headers[self._header.strip().lower()] = self._value.strip()
        self._header, self._value = b"", b""

    def headers_finished(self):
        _kind, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise BadInput("a part of the multipart/form-data body has no name; " + NEEDS)
        name = name.decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.has_file:
                raise BadInput("the multipart/form-data body holds the field 'file' twice; send one archive")
            self.has_file = True
        elif name in self.fields or len(self.fields) >= MAX_FIELDS:
            raise BadInput("the multipart/form-data body holds the field %r twice, or more than %d fields beside "
                           "'file'" % (name[:64], MAX_FIELDS))
        self._name, self._chunks, self._size = name, [], 0

    def part_data(self, data, start, end):
        if self._name == FILE_FIELD:
            self.out.write(data[start:end])
            self.file_bytes += end - start
            return
        self._size += end - start
        if self._size > self.max_field_bytes:
            raise BadInput("the multipart/form-data field %r is more than %d bytes" % (self._name[:64],
                                                                                       self.max_field_bytes))
        self._chunks.append(data[start:end])

    def part_end(self):
        if self._name is not None and self._name != FILE_FIELD:
            try:
                self.fields[self._name] = b"".join(self._chunks).decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput("the multipart/form-data field %r is not UTF-8 text" % self._name[:64])
        self._name = None

    def end(self):
        self.ended = True


def multipart_boundary(request):
    """The boundary of a multipart/form-data body; ``BadInput`` (saying what to send) for any other body."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary or len(boundary) > 200:
        raise BadInput(NEEDS)
    return boundary


async def receive_upload(request, srv, store, user):
    """Receive the multipart body of ``request`` for ``user`` (see the module's docstring): an ``Upload``."""
    boundary = multipart_boundary(request)
    limits = srv.limits
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else 0
    limits.check_upload(declared)  # before any byte: 413
    loop = asyncio.get_running_loop()
    # Would a job be taken now (the user's jobs and bytes, all jobs)? A client that cannot get one sends nothing.
    await loop.run_in_executor(None, store.check_admission, user, declared)
    receipt = store.receiving(user)
    out, path = store.spool_file()
    parts = _Parts(out, limits.max_json_bytes)
    parser = MultipartParser(boundary, parts.callbacks(), max_header_count=8, max_header_size=8192)

    def feed(batch):  # on a pool thread: parsing and writing to disk stay off the event loop
        for piece in batch:
            parser.write(piece)
        if parts.file_bytes > parts.written:
            receipt.add(parts.file_bytes - parts.written)
            parts.written = parts.file_bytes

    try:
        received, batch, batch_bytes = 0, [], 0
        try:
            async for piece in _pieces(request, None, srv.registry.liveness_timeout):
                received += len(piece)
                limits.check_upload(received)
                batch.append(piece)
                batch_bytes += len(piece)
                if batch_bytes >= FEED_BYTES:
                    await loop.run_in_executor(srv.decode_pool, feed, batch)
                    batch, batch_bytes = [], 0
            await loop.run_in_executor(srv.decode_pool, feed, batch)
        except MultipartParseError as exc:
            raise BadInput("the multipart/form-data body is malformed (%s); %s" % (exc, NEEDS))
        out.close()
        if not parts.ended:
            raise BadInput("the multipart/form-data body ended before its closing boundary (cut off?); " + NEEDS)
        if not parts.has_file:
            raise BadInput(NEEDS)
        return Upload(path, parts.file_bytes, parts.fields, receipt)
    except BaseException:
        out.close()
        discard_upload(path, receipt)
        raise


def discard_upload(path, receipt):
    try:
        os.unlink(path)
    except OSError:
        pass
    receipt.close()
