"""DICOM series checked from their headers before a pixel is read: the files of one series must form one regular
volume, or the request is refused with a 400 that names the series and says why (``BadInput``).

A series folder's files are read with pydicom up to the pixel data (``stop_before_pixels``; values longer than
``DEFER_BYTES`` are skipped, not read), grouped by SeriesInstanceUID, and the chosen series checked:

* one copy of each SOP instance (a file copied under two names is read once, with a note);
* localizers (``ImageType`` LOCALIZER) are left out, with a note;
* b-values (``DiffusionBValue``, else Siemens' (0019,100C), else GE's (0043,1039), else 0, as nnunet-serve reads
  them): several are refused unless the request's ``bvalue_for_filtering`` selects the files whose b-value is the
  closest to it (the lower one on a tie), as nnunet-serve's ``filter_by_bvalue`` does;
* one size (Rows x Columns), one pixel spacing, one pixel format, one sample per pixel, one orientation;
* several echoes (``EchoNumbers``) are refused;
* each position once: positions repeated are refused, naming the tag that tells the repeats apart when one does
  (``TemporalPositionIdentifier``: dynamics, ``AcquisitionNumber``, ``TriggerTime``: cardiac phases);
* the slices stacked along their normal (a gantry tilt shears the stack: refused, with the angle) at one regular
  spacing (a missing slice or a change of spacing is refused, with the gap).

Several multi-frame files are refused; one multi-frame file is the volume SimpleITK reads from it (its frames are
not checked here). The volume's files are listed in slice order, ascending along the normal (row x column
direction cosines), which is the order SimpleITK reads them in and the order of the array's k axis.

The folder given is the server's private copy of the one a request named (``paths.ConfinedFiles.read``: its regular
files, none through a link), or a command user's own folder.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from ..validate import BadInput

DEFER_BYTES = 4096  # header values longer than this are skipped (never read): no tag of ours is that long
ORIENTATION_TOL = 1e-4  # direction cosines that differ by less are the same orientation
SPACING_TOL = 0.02  # slice gaps may differ from the median gap by 2% (at least 0.01 mm): rounding in the headers
SHEAR_TOL = 0.1  # in-plane offset of a slice from the stack's line, in pixels (at least 0.01 mm)

SIEMENS_BVALUE = (0x0019, 0x100C)
GE_BVALUE = (0x0043, 0x1039)
TAGS = ["SpecificCharacterSet", "ImageType", "SOPInstanceUID", "SeriesDescription", "EchoNumbers", "TriggerTime",
        "GantryDetectorTilt", "DiffusionBValue", SIEMENS_BVALUE, GE_BVALUE, "SeriesInstanceUID", "AcquisitionNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "TemporalPositionIdentifier", "SamplesPerPixel",
        "NumberOfFrames", "Rows", "Columns", "PixelSpacing", "BitsAllocated", "RescaleIntercept", "RescaleSlope"]
# Tags that tell repeated positions apart (what the repeats are), in the order they are named.
REPEAT_KEYS = (("temporal", "TemporalPositionIdentifier", "time points"),
               ("acquisition", "AcquisitionNumber", "acquisitions"),
               ("trigger", "TriggerTime", "trigger times (cardiac phases)"))


@dataclass
class SliceHeader:
    """What the checks need of one DICOM image file."""

    path: str
    sop_uid: str
    series_uid: str
    rows: int
    cols: int
    frames: int = 1
    samples: int = 1
    bits: int = 16
    image_type: Tuple[str, ...] = ()
    ipp: Optional[np.ndarray] = None
    iop: Optional[np.ndarray] = None
    pixel_spacing: Optional[Tuple[float, float]] = None
    rescale: Tuple[float, float] = (1.0, 0.0)
    bvalue: float = 0.0
    echo: Optional[str] = None
    temporal: Optional[str] = None
    acquisition: Optional[str] = None
    trigger: Optional[str] = None
    tilt: Optional[float] = None
    description: str = ""


@dataclass
class Volume:
    """A checked series: its files in slice order and the geometry read from their headers (SimpleITK's order:
    size and spacing (i, j, k), direction as a row-major 3x3)."""

    folder: str
    series_uid: str
    files: List[str]
    size: Tuple[int, int, int]
    pixel_bytes: int  # bytes of one voxel as SimpleITK will read it (an upper bound)
    spacing: Optional[Tuple[float, float, float]] = None
    origin: Optional[Tuple[float, float, float]] = None
    direction: Optional[Tuple[float, ...]] = None
    float_output: bool = False  # the files rescale differently: read as float32
    notes: List[str] = field(default_factory=list)

    @property
    def voxels(self):
        return int(np.prod(self.size, dtype=object))


# ---------------------------------------------------------------------------------------------------------- headers

def _text(value):
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().strip("\0").strip()
    return text or None


def _get(ds, key):
    """The value of a keyword or (group, element) of ``ds``, None when absent or unreadable."""
    try:
        value = ds.get(key)
    except Exception:  # noqa: BLE001 -- a malformed value raises when pydicom converts it
        return None
    return value.value if hasattr(value, "value") and not isinstance(key, str) else value


def _number_or(value, default):
    v = _first_number(value)
    return default if v is None else v


def _first_number(value):
    text = _text(value)
    if text is None:
        return None
    text = text.strip("[]").replace(",", "\\").split("\\")[0].strip()
    try:
        return float(text)
    except ValueError:
        return None


def bvalue_of(ds):
    """The b-value of a file as nnunet-serve reads it: DiffusionBValue, else Siemens' (0019,100C), else GE's
    (0043,1039) (its first value; of a number longer than 5 digits the last 4, GE's encoding), else 0."""
    for tag in ((0x0018, 0x9087), SIEMENS_BVALUE):
        v = _first_number(_get(ds, tag))
        if v is not None:
            return v
    text = _text(_get(ds, GE_BVALUE))
    if text is not None:
        first = text.strip("[]").replace(",", "\\").split("\\")[0].strip()
        if len(first) > 5:
            first = first[-4:]
        try:
            return float(first)
        except ValueError:
            pass
    return 0.0


def _floats(ds, keyword, n):
    """``n`` finite numbers of a multi-valued tag as an array, else None."""
    value = _get(ds, keyword)
    if value is None:
        return None
    try:
        out = [float(v) for v in (value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
                                  else [value])]
    except (TypeError, ValueError):
        return None
    return np.array(out, dtype=float) if len(out) == n and np.all(np.isfinite(out)) else None


def _int(ds, keyword, default=None):
    v = _first_number(_get(ds, keyword))
    return default if v is None or v != int(v) else int(v)


def read_header(path):
    """The ``SliceHeader`` of a DICOM image file, or None when ``path`` is not DICOM or not an image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    ds = None
    for force in (False, True):  # without the preamble and file meta (old files) only when it reads as an image
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_BYTES, specific_tags=TAGS,
                                 force=force)
            break
        except InvalidDicomError:
            continue
        except OSError as exc:
            raise BadInput("DICOM file %s cannot be read: %s" % (os.path.basename(path), exc))
        except Exception:  # noqa: BLE001 -- pydicom raises many kinds of errors on files that are not DICOM
            return None
    if ds is None:
        return None
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    series, sop = _text(_get(ds, "SeriesInstanceUID")), _text(_get(ds, "SOPInstanceUID"))
    if not rows or not cols or not series or not sop or rows < 0 or cols < 0:
        return None  # not an image (a report, a DICOMDIR, a presentation state ...)
    ps = _floats(ds, "PixelSpacing", 2)
    image_type = _text(_get(ds, "ImageType")) or ""
    return SliceHeader(
        path=path, sop_uid=sop, series_uid=series, rows=rows, cols=cols, frames=max(1, _int(ds, "NumberOfFrames", 1)),
        samples=_int(ds, "SamplesPerPixel", 1), bits=_int(ds, "BitsAllocated", 16),
        image_type=tuple(image_type.upper().split("\\")),
        ipp=_floats(ds, "ImagePositionPatient", 3), iop=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=tuple(ps) if ps is not None else None,
        rescale=(_number_or(_get(ds, "RescaleSlope"), 1.0), _number_or(_get(ds, "RescaleIntercept"), 0.0)),
        bvalue=bvalue_of(ds), echo=_text(_get(ds, "EchoNumbers")),
        temporal=_text(_get(ds, "TemporalPositionIdentifier")), acquisition=_text(_get(ds, "AcquisitionNumber")),
        trigger=_text(_get(ds, "TriggerTime")),
        tilt=_first_number(_get(ds, "GantryDetectorTilt")), description=_text(_get(ds, "SeriesDescription")) or "")


def scan_folder(folder):
    """``{series_uid: [SliceHeader]}`` of the DICOM images directly in ``folder`` (sub-folders and files that are not
    DICOM images are left out)."""
    series = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            continue
        head = read_header(entry.path)
        if head is not None:
            series.setdefault(head.series_uid, []).append(head)
    return series


# ---------------------------------------------------------------------------------------------------------- checks

def _fmt(v):
    return "%g" % v


def _counts(values):
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _describe_counts(counts, fmt=str):
    return ", ".join("%s: %d file(s)" % (fmt(k), n) for k, n in sorted(counts.items(), key=lambda kv: _sortable(kv[0])))


def _sortable(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _cluster(vectors, tol):
    """Group indices of ``vectors`` whose entries differ by less than ``tol``; groups in order of first member."""
    groups = []
    for i, v in enumerate(vectors):
        for g in groups:
            if np.max(np.abs(vectors[g[0]] - v)) < tol:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _plane_name(iop):
    normal = np.cross(iop[:3], iop[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _pixel_bytes(heads):
    """Bytes of a voxel as SimpleITK (GDCM) reads these files: the stored type, widened by a rescale (an integer
    rescale to at most 32 bits, a fractional one to float64)."""
    bits = max(h.bits for h in heads)
    stored = max(1, bits // 8)
    rescales = {h.rescale for h in heads}
    if rescales == {(1.0, 0.0)}:
        return stored
    if any(s != int(s) or i != int(i) for s, i in rescales):
        return 8
    return max(4, stored)


def select_volume(heads, name, bvalue=None):
    """Check the ``SliceHeader`` list of one series and return its ``Volume`` (``BadInput`` naming ``name`` and the
    reason when the files do not form one regular volume). ``bvalue``: the request's ``bvalue_for_filtering``."""
    uid = heads[0].series_uid
    what = "the DICOM series in %s (SeriesInstanceUID %s)" % (name, uid)
    notes = []

    def refuse(reason, hint):
        raise BadInput("%s %s; %s" % (what, reason, hint))

    seen, unique = set(), []
    for h in heads:
        if h.sop_uid not in seen:
            seen.add(h.sop_uid)
            unique.append(h)
    if len(unique) < len(heads):
        notes.append("%s: %d file(s) repeat an image of the series (same SOPInstanceUID) and were read once"
                     % (name, len(heads) - len(unique)))
    heads = unique
    localizers = [h for h in heads if "LOCALIZER" in h.image_type]
    if localizers and len(localizers) < len(heads):
        heads = [h for h in heads if "LOCALIZER" not in h.image_type]
        notes.append("%s: %d localizer image(s) (ImageType LOCALIZER) were left out of the volume"
                     % (name, len(localizers)))
    elif localizers:
        refuse("holds only localizer images (ImageType LOCALIZER)", "give a series that holds a volume")

    bvals = _counts(h.bvalue for h in heads)
    if len(bvals) > 1:
        if bvalue is None:
            refuse("holds %d b-values (%s)" % (len(bvals), _describe_counts(bvals, _fmt)),
                   "set bvalue_for_filtering to the b-value to read, or put each b-value in its own folder")
        best = sorted(bvals, key=lambda b: (abs(b - bvalue), b))[0]
        heads = [h for h in heads if h.bvalue == best]
        notes.append("%s: the %d file(s) of b-value %s were read (bvalue_for_filtering %s; the series also holds "
                     "b-values %s)" % (name, len(heads), _fmt(best), _fmt(bvalue),
                                       ", ".join(_fmt(b) for b in sorted(bvals) if b != best)))

    multi = [h for h in heads if h.frames > 1]
    if multi and len(heads) > 1:
        refuse("holds %d files of which %d are multi-frame" % (len(heads), len(multi)),
               "give one multi-frame file, or single-frame files, per series folder")
    for label, values, hint in (
            ("sizes (Rows x Columns)", ["%dx%d" % (h.rows, h.cols) for h in heads], "one size per volume"),
            ("samples per pixel", [h.samples for h in heads], "one gray value per pixel"),
            ("pixel formats (BitsAllocated)", [h.bits for h in heads], "one pixel format per volume")):
        counts = _counts(values)
        if len(counts) > 1:
            refuse("holds %d %s (%s)" % (len(counts), label, _describe_counts(counts)),
                   "%s: put the others in their own folder" % hint)
    if heads[0].samples != 1:
        refuse("has %d samples per pixel (colour)" % heads[0].samples, "automatic models take gray-value volumes")
    echoes = _counts(h.echo for h in heads if h.echo is not None)
    if len(echoes) > 1:
        refuse("holds %d echoes (EchoNumbers %s)" % (len(echoes), _describe_counts(echoes)),
               "put each echo in its own folder")

    size_ij = (heads[0].cols, heads[0].rows)
    rescales = {h.rescale for h in heads}
    if len(heads) == 1:  # one slice, or one multi-frame file: SimpleITK reads its geometry
        h = heads[0]
        return Volume(folder=name, series_uid=uid, files=[h.path], size=size_ij + (h.frames,),
                      pixel_bytes=_pixel_bytes(heads), notes=notes)

    missing = [os.path.basename(h.path) for h in heads if h.ipp is None or h.iop is None]
    if missing:
        refuse("has %d file(s) without ImagePositionPatient / ImageOrientationPatient (%s)"
               % (len(missing), ", ".join(missing[:3])), "a volume needs the position of every slice")
    iops = [h.iop for h in heads]
    groups = _cluster(iops, ORIENTATION_TOL)
    if len(groups) > 1:
        refuse("holds slices in %d orientations (%s)" % (len(groups), ", ".join(
            "%s: %d file(s)" % (_plane_name(iops[g[0]]), len(g)) for g in groups)),
               "a volume has one: put the others in their own folder")
    spacings = [np.array(h.pixel_spacing) if h.pixel_spacing else np.zeros(2) for h in heads]
    if any(h.pixel_spacing is None for h in heads):
        refuse("has file(s) without PixelSpacing", "a volume needs the pixel spacing of every slice")
    if len(_cluster(spacings, 1e-4 * max(1.0, float(np.max(spacings))))) > 1:
        refuse("holds slices of several pixel spacings (%s)" % ", ".join(sorted({
            "%sx%s" % (_fmt(s[0]), _fmt(s[1])) for s in spacings})), "one pixel spacing per volume")
    row, col = iops[0][:3], iops[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        refuse("has an ImageOrientationPatient %s whose directions are not orthonormal" % list(iops[0]),
               "the files are damaged")
    normal = np.cross(row, col)
    pos = np.array([h.ipp for h in heads])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    heads, pos, d = [heads[i] for i in order], pos[order], d[order]

    gaps = np.diff(d)
    moving = gaps[gaps > 1e-6]
    same_eps = min(0.01, 0.1 * float(np.median(moving))) if moving.size else 0.01
    repeated = gaps < same_eps
    if repeated.any():
        at = np.flatnonzero(repeated)
        n_pos = len(heads) - int(repeated.sum())
        for key, tag, plural in REPEAT_KEYS:
            values = [getattr(h, key) for h in heads]
            if None in values or len(set(values)) < 2:
                continue
            per_value = {}
            for h, dv in zip(heads, d):
                per_value.setdefault(getattr(h, key), []).append(dv)
            if all(np.all(np.diff(sorted(v)) >= same_eps) for v in per_value.values()):
                refuse("holds %d %s (%s %s) at %d slice positions" % (len(per_value), plural, tag, ", ".join(
                    sorted(per_value, key=_sortable))[:200], n_pos),
                       "a volume has one: put each in its own folder")
        i = int(at[0])
        refuse("has %d file(s) at a position already taken (e.g. %s and %s, both %.3f mm along the normal)"
               % (len(at), os.path.basename(heads[i].path), os.path.basename(heads[i + 1].path), d[i]),
               "a volume has one slice per position: remove the repeats or split them into their own folders")

    px = float(min(heads[0].pixel_spacing))
    along = (d - d[0])[:, None] * normal[None, :]
    offsets = np.linalg.norm(pos - pos[0] - along, axis=1)
    if offsets.max() > max(0.01, SHEAR_TOL * px):
        k = int(np.argmax(offsets))
        angle = np.degrees(np.arctan2(offsets[k], d[k] - d[0]))
        tilt = {h.tilt for h in heads if h.tilt is not None}
        refuse("is not stacked along its slices' normal: slice %d lies %.2f mm to the side of the first one over "
               "%.2f mm (a sheared stack: gantry tilt of %.1f degrees%s)"
               % (k, offsets[k], d[k] - d[0], angle, "; GantryDetectorTilt %s" % ", ".join(_fmt(t) for t in tilt)
                  if tilt else ""),
               "resample it to a regular grid first (dcm2niix, for one, corrects gantry tilt)")

    m = float(np.median(gaps))
    off = np.abs(gaps - m) > max(0.01, SPACING_TOL * m)
    if off.any():
        k = int(np.flatnonzero(off)[0])
        refuse("is not evenly spaced: slices %d and %d are %.3f mm apart where the spacing is %.3f mm (%s)"
               % (k, k + 1, gaps[k], m, "slices missing?" if gaps[k] > m else "irregular spacing"),
               "give a series without gaps and of one slice spacing")

    spacing = (float(heads[0].pixel_spacing[1]), float(heads[0].pixel_spacing[0]), m)
    direction = tuple(np.stack([row, col, normal], axis=1).ravel().tolist())
    return Volume(folder=name, series_uid=uid, files=[h.path for h in heads], size=size_ij + (len(heads),),
                  pixel_bytes=_pixel_bytes(heads), spacing=spacing, origin=tuple(pos[0].tolist()),
                  direction=direction, float_output=len(rescales) > 1, notes=notes)


def series_volume(folder, series_uid=None, bvalue=None, name=None):
    """The checked ``Volume`` of the one DICOM series in ``folder`` (or the one with ``series_uid``)."""
    name = name or folder
    if not os.path.isdir(folder):
        raise BadInput("DICOM input %s is not a folder (is_dicom: each series folder holds one DICOM series)" % name)
    series = scan_folder(folder)
    if not series:
        raise BadInput("no DICOM series in %s (is_dicom is set: each series folder must hold the files of one DICOM "
                       "series; for NIfTI/NRRD/MHA files leave is_dicom off)" % name)
    if series_uid is None:
        if len(series) > 1:
            raise BadInput("%s holds %d DICOM series (%s); put each series in its own folder"
                           % (name, len(series), ", ".join(
                               "%s: %d file(s)%s" % (uid, len(h), " '%s'" % h[0].description if h[0].description
                                                     else "") for uid, h in sorted(series.items()))))
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise BadInput("%s has no DICOM series %s (it has %s)" % (name, series_uid, ", ".join(sorted(series))))
    return select_volume(series[series_uid], name, bvalue)
