"""The image files the server reads, recognised by their content: an allowlist, because a reader that follows a file
name written inside another file (MetaImage ``ElementDataFile``, NRRD ``data file``, an Analyze/NIfTI pair's
``.img``, HDF5 / MINC external storage, Bruker's parameter files) reads wherever that name points.

* NIfTI-1 / NIfTI-2 as one file (magic ``n+1`` / ``n+2``), gzip-compressed or not, named ``.nii`` / ``.nii.gz``;
  a header/image pair (``ni1`` / ``ni2``) and Analyze 7.5 (no magic) are refused.
* NRRD with its data in the same file (``.nrrd``): every field of the header (up to its empty line, as teem reads
  it, lines ending in LF or CRLF) is checked, and one that names a data file (``data file`` / ``datafile``, any
  case or spacing) is refused.
* MetaImage with its data in the same file (``.mha``): MetaIO stops reading its header at the first field named
  exactly ``ElementDataFile``, but a float field whose values are missing swallows the next line whole, so a
  ``ElementDataFile = LOCAL`` line can be skipped and a later one obeyed. Accepted only when the file holds the
  name ``ElementDataFile`` once, on a line of its own (within the first ``HEADER_LIMIT`` bytes), whose value is
  ``LOCAL``: a separator ``=`` or ``:`` (MetaIO takes both), anything else refused.
* DICOM (read with GDCM): the ``DICM`` preamble, or a file pydicom reads as an image.

``identify(path, name)`` returns the format; ``IMAGEIO[format]`` is the ITK reader the file is then read with (never
chosen again by SimpleITK from the name or content: a polyglot file is read as what it was checked as). Everything
else is a ``BadInput`` (400) saying what the file is and what is accepted. These checks run on the server's private
copy of the file (``paths.ConfinedFiles``): what is checked is what is read.
"""

import gzip
import os
import re
import struct
import zlib

from ..validate import BadInput

NIFTI, NRRD, META, DICOM = "nifti", "nrrd", "meta", "dicom"
IMAGEIO = {NIFTI: "NiftiImageIO", NRRD: "NrrdImageIO", META: "MetaImageIO", DICOM: "GDCMImageIO"}
ACCEPTED = ("this server reads NIfTI (.nii, .nii.gz), NRRD (.nrrd) and MetaImage (.mha) files that hold their own "
            "data, and DICOM")
HEADER_LIMIT = 1 << 20  # a NRRD / MetaImage header must end within this many bytes
CHUNK = 1 << 20
NRRD_MAGICS = (b"NRRD00.01", b"NRRD0001", b"NRRD0002", b"NRRD0003", b"NRRD0004", b"NRRD0005")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ELEMENT_DATA_FILE = b"ElementDataFile"
META_LOCAL = re.compile(rb"[ \t\x0b\x0c\r\n]*ElementDataFile[ \t]*[=:][=: \t]*(LOCAL|Local|local)[ \t\r]*\n")


def _refuse(name, what):
    return BadInput("input %s %s; %s" % (name, what, ACCEPTED))


def _nifti(head):
    """"single", "pair" or "analyze" for a NIfTI-1/2 or Analyze header at the start of ``head``; None otherwise."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            magic = head[344:348]
            return "single" if magic == b"n+1\0" else "pair" if magic == b"ni1\0" else "analyze"
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            magic = head[4:8]
            return "single" if magic == b"n+2\0" else "pair" if magic == b"ni2\0" else None
    return None


def _check_nifti(kind, name, lower, compressed):
    if kind == "pair":
        raise _refuse(name, "is the header of a NIfTI header/image pair (its data is in another file, which is refused)")
    if kind == "analyze":
        raise _refuse(name, "is an Analyze 7.5 header (its data is in another file, which is refused)")
    if not lower.endswith(".nii.gz" if compressed else (".nii", ".nii.gz")):
        raise _refuse(name, "is a NIfTI image named without its extension: name it .nii.gz" if compressed else
                      "is a NIfTI image named without its extension: name it .nii")
    return NIFTI


def _lines(data):
    """Header lines as teem reads them (LF or CRLF ends a line); None for a line that holds another CR or a NUL."""
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        yield None if (b"\r" in line or b"\0" in line) else line


def _check_nrrd(path, name):
    with open(path, "rb") as f:
        data = f.read(HEADER_LIMIT)
    lines = _lines(data)
    if next(lines) not in NRRD_MAGICS:
        raise _refuse(name, "starts like a NRRD file but its first line is not a NRRD magic (NRRD0001 to NRRD0005)")
    ended = False
    for line in lines:
        if line is None:
            raise _refuse(name, "has a NRRD header with a stray carriage return or NUL byte")
        if not line:
            ended = True
            break
        if line.startswith(b"#"):
            continue
        for sep in (b": ", b":"):  # teem's field ends at ': '; a key/value pair's key at ':='
            if re.sub(rb"\s", b"", line.split(sep, 1)[0]).lower() == b"datafile":
                raise _refuse(name, "is a NRRD header whose data is in another file ('data file'), which is "
                                    "refused: attach the data (save as .nrrd)")
    if not ended:
        raise _refuse(name, "has a NRRD header that does not end (no empty line) within its first %d bytes"
                      % HEADER_LIMIT)
    return NRRD


def _count(path, needle, start=0):
    """How many times ``needle`` occurs in the file from byte ``start`` (read in chunks)."""
    n, tail = 0, b""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            block = f.read(CHUNK)
            if not block:
                return n
            data = tail + block
            n += data.count(needle)
            tail = data[-(len(needle) - 1):]  # too short to hold the needle: nothing is counted twice


def _check_meta(path, name):
    with open(path, "rb") as f:
        head = f.read(HEADER_LIMIT)
    at = head.find(ELEMENT_DATA_FILE)
    if at < 0:
        raise _refuse(name, "is a MetaImage header without ElementDataFile in its first %d bytes" % HEADER_LIMIT)
    line_start = head.rfind(b"\n", 0, at) + 1
    if META_LOCAL.match(head, line_start) is None:  # the line of its first mention, whole: "ElementDataFile = LOCAL"
        end = head.find(b"\n", at)
        line = head[line_start:end if end >= 0 else at + 200]
        raise _refuse(name, "is a MetaImage header whose data is not in the same file (%r): ElementDataFile must "
                            "be LOCAL (save as .mha)" % line.strip()[:200].decode("latin-1"))
    if _count(path, ELEMENT_DATA_FILE) != 1:
        raise _refuse(name, "is a MetaImage file that names ElementDataFile more than once")
    return META


def _hdf5(path, size_hint):
    """The HDF5 signature at 0, 512, 1024, 2048, ... (where HDF5 looks for it)."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            sig = f.read(8)
            if len(sig) < 8:
                return False
            if sig == HDF5_MAGIC:
                return True
            offset = 512 if offset == 0 else offset * 2
            if offset > size_hint:
                return False


def identify(path, name=None):
    """The format (``NIFTI``, ``NRRD``, ``META``, ``DICOM``) of the image file ``path`` from its content and name, or
    ``BadInput`` saying what it is and what this server reads (``name``: the input as the request names it)."""
    name = name or path
    lower = path.lower()
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as exc:
        raise BadInput("input %s cannot be read: %s" % (name, exc.strerror or exc))
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(544)
        except (OSError, EOFError, zlib.error) as exc:
            raise _refuse(name, "is a damaged gzip file (%s)" % exc)
        kind = _nifti(inner)
        if kind is None:
            raise _refuse(name, "is a gzip file that does not hold a NIfTI image")
        return _check_nifti(kind, name, lower, compressed=True)
    kind = _nifti(head)
    if kind is not None:
        return _check_nifti(kind, name, lower, compressed=False)
    if head.startswith(b"NRRD"):
        if not path.endswith((".nrrd", ".nhdr")):
            raise _refuse(name, "is a NRRD file named without its extension: name it .nrrd")
        return _check_nrrd(path, name)
    if head[128:132] == b"DICM":
        return DICOM
    if _hdf5(path, size):
        raise _refuse(name, "is an HDF5 file (MINC 2, ITK's .h5): HDF5 files may keep their data in other files, "
                            "and are refused")
    if head[:4] in (b"CDF\x01", b"CDF\x02"):
        raise _refuse(name, "is a netCDF file (MINC 1), which is refused")
    if path.endswith((".mha", ".mhd")):  # the only names ITK's MetaImage reader takes
        return _check_meta(path, name)
    if b"NDims" in head and ELEMENT_DATA_FILE in head:
        raise _refuse(name, "is a MetaImage file named without its extension: name it .mha")
    from .dicomseries import read_header

    if read_header(path) is not None:  # DICOM without its preamble (old files), when it reads as an image
        return DICOM
    raise _refuse(name, "is not an image file this server reads")
