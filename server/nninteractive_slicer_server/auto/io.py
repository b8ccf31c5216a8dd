"""Reading studies and writing label maps: NIfTI / NRRD / MHA files and DICOM series, through SimpleITK.

Geometry is never approximated: an output image gets its input's origin, spacing and direction by
``CopyInformation``, and an image read from DICOM keeps SimpleITK's geometry of the series (the slice order is
SimpleITK's, along the slice normal; ``Series.files`` lists the files in that order, so frame ``k`` of the array
came from ``files[k]``).

Arrays: ``sitk.GetArrayFromImage`` gives ``[k, j, i]`` (slice, row, column) and the matching spacing is the image's
spacing reversed; that is the order nnU-Net's SimpleITK reader uses, so arrays go to ``AutoSegmenter.predict`` as is.

Every problem with an input a request named (missing, not an image, not one DICOM series, not 3D) is a
``BadInput`` (HTTP 400) that says which path and what is wrong.

``check(path)``: the readers call it on every file they are about to read beside the one named (each DICOM file of a
series; the data file a MetaImage or detached NRRD header names; the .img of an Analyze/NIfTI pair) before reading
anything, so that the server's path confinement (``jobs.PathGuard``) covers them: a header uploaded in an archive must
not read a file elsewhere on the server.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Series:
    """One input volume. ``files``: the DICOM files in the order of the image's slices (k axis); empty for files
    that are not DICOM. ``series_uid`` for DICOM input."""

    path: str
    image: "object"  # SimpleITK.Image
    files: List[str] = field(default_factory=list)
    series_uid: Optional[str] = None

    @property
    def is_dicom(self):
        return bool(self.files)


def _sitk():
    import SimpleITK as sitk

    return sitk


HEADER_BYTES = 1 << 16


def _detached_value(path, value, what):
    v = value.strip()
    if not v or v.upper() in ("LOCAL", "NONE"):
        return []
    if v.split()[0].upper() == "LIST" or "%" in v:
        raise BadInput("input %s: its %s (%r) is a list or pattern of data files, which this server does not read; "
                       "give one file (or the data in the header's file)" % (path, what, v))
    return [os.path.join(os.path.dirname(path), v)]


def detached_files(path):
    """The files SimpleITK reads besides ``path`` itself: a MetaImage's ``ElementDataFile``, a NRRD header's
    ``data file``, an Analyze/NIfTI pair's other half. ``BadInput`` for lists and patterns of data files."""
    lower = path.lower()
    if lower.endswith((".mha", ".mhd")):
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES).decode("latin-1")
        for line in head.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "ElementDataFile":
                return _detached_value(path, value, "ElementDataFile")
        return []
    if lower.endswith((".nrrd", ".nhdr")):
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES).decode("latin-1")
        for line in head.splitlines()[1:]:
            if not line.strip():
                break  # the end of the header
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("data file", "datafile"):
                return _detached_value(path, value.lstrip("="), "data file")
        return []
    for a, b in ((".hdr", ".img"), (".img", ".hdr"), (".img.gz", ".hdr"), (".hdr.gz", ".img")):
        if lower.endswith(a):
            stem = path[:-len(a)]
            return [stem + ext for ext in (b, b + ".gz") if os.path.lexists(stem + ext)]
    return []


def dicom_series_in(folder):
    """``{series_uid: [files in slice order]}`` of the DICOM series directly in ``folder``."""
    sitk = _sitk()
    reader = sitk.ImageSeriesReader
    try:
        uids = reader.GetGDCMSeriesIDs(folder) or ()
    except RuntimeError:
        uids = ()
    return {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}


def read_dicom_series(folder, series_uid=None, check=None):
    """Read the one DICOM series in ``folder`` (or the one with ``series_uid``) with SimpleITK (``check``: see the
    module's notes)."""
    sitk = _sitk()
    if not os.path.isdir(folder):
        raise BadInput("DICOM input %s is not a folder (is_dicom: each series folder holds one DICOM series)" % folder)
    series = dicom_series_in(folder)
    if not series:
        raise BadInput("no DICOM series in %s (is_dicom is set: each series folder must hold the files of one DICOM "
                       "series; for NIfTI/NRRD/MHA files leave is_dicom off)" % folder)
    if series_uid is None:
        if len(series) > 1:
            raise BadInput("%s holds %d DICOM series (%s); put each series in its own folder"
                           % (folder, len(series), ", ".join(sorted(series))))
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise BadInput("%s has no DICOM series %s (it has %s)" % (folder, series_uid, ", ".join(sorted(series))))
    files = series[series_uid]
    for f in files:
        if check is not None:
            check(f)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise BadInput("the DICOM series in %s cannot be read: %s" % (folder, _first_line(exc)))
    _check_3d(image, folder)
    return Series(path=folder, image=image, files=list(files), series_uid=series_uid)


def read_image(path, check=None):
    """Read one image file (NIfTI, NRRD, MHA, any format SimpleITK reads; ``check``: see the module's notes)."""
    sitk = _sitk()
    if not os.path.exists(path):
        raise BadInput("input %s does not exist" % path)
    if os.path.isdir(path):
        raise BadInput("input %s is a folder; a folder is read as a DICOM series only when is_dicom is set" % path)
    try:
        others = detached_files(path)
    except OSError as exc:
        raise BadInput("input %s cannot be read: %s" % (path, exc))
    for other in others:
        if check is not None:
            check(other)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise BadInput("input %s cannot be read as an image: %s" % (path, _first_line(exc)))
    _check_3d(image, path)
    return Series(path=path, image=image)


def read_series(path, is_dicom=False, check=None):
    """A DICOM series (``is_dicom`` and ``path`` a folder) or an image file (also when ``is_dicom``: a file is read
    as the image it is, as the established server does)."""
    if is_dicom and os.path.isdir(path):
        return read_dicom_series(path, check=check)
    if not os.path.exists(path):
        raise BadInput("series %s does not exist" % path)
    return read_image(path, check=check)


def _check_3d(image, where):
    if image.GetDimension() != 3:
        raise BadInput("%s is a %dD image; automatic models take 3D volumes" % (where, image.GetDimension()))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInput("%s has %d components per voxel; give one volume per series (one channel each)"
                       % (where, image.GetNumberOfComponentsPerPixel()))


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------- geometry

def same_geometry(a, b, tol=1e-5):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def resample_to(image, reference, is_mask=False):
    """``image`` on ``reference``'s grid (identity transform: both are in patient coordinates). Linear for images,
    nearest neighbour for masks; 0 outside. Returns ``image`` itself when the grids already agree."""
    sitk = _sitk()
    if same_geometry(image, reference):
        return image
    interp = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    pixel = image.GetPixelID() if is_mask else sitk.sitkFloat32
    src = image if is_mask else sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(src, reference, sitk.Transform(), interp, 0.0, pixel)


def to_array(image):
    """``(array [k, j, i], spacing [k, j, i])``."""
    sitk = _sitk()
    return sitk.GetArrayFromImage(image), [float(s) for s in reversed(image.GetSpacing())]


def from_array(array, reference, vector=False):
    """An image holding ``array`` (``[k, j, i]``, or ``[k, j, i, c]`` with ``vector``) with ``reference``'s exact
    origin, spacing and direction."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector)
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    return image


def write_image(image, path, compress=True):
    sitk = _sitk()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sitk.WriteImage(image, path, compress)
    return path


def mask_bbox(mask):
    """Half-open ``[(lo, hi), ...]`` per axis of the nonzero voxels of ``mask`` (numpy), or None when empty."""
    nz = np.nonzero(mask)
    if not nz[0].size:
        return None
    return [(int(a.min()), int(a.max()) + 1) for a in nz]


def padded_bbox(bbox, padding, shape):
    """``bbox`` grown by ``padding`` voxels per axis and clipped to ``shape``."""
    return [(max(0, lo - int(p)), min(int(n), hi + int(p))) for (lo, hi), p, n in zip(bbox, padding, shape)]
