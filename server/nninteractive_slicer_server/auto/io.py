"""Reading studies and writing label maps: NIfTI / NRRD / MHA files and DICOM series, through SimpleITK.

Geometry is never approximated: an output image gets its input's origin, spacing and direction by
``CopyInformation``, and an image read from DICOM keeps SimpleITK's geometry of the series, read in the slice order
``dicomseries`` checked (ascending along the slice normal; ``Series.files`` lists the files in that order, so frame
``k`` of the array came from ``files[k]``).

Arrays: ``sitk.GetArrayFromImage`` gives ``[k, j, i]`` (slice, row, column) and the matching spacing is the image's
spacing reversed; that is the order nnU-Net's SimpleITK reader uses, so arrays go to ``AutoSegmenter.predict`` as is.

Every input is probed before it is read (``probe_series``, ``probe_image``): its size, pixel type and geometry from
its header alone (SimpleITK's ``ReadImageInformation``; a DICOM series' headers checked by ``dicomseries``), so that
sizes can be checked and memory reserved before any pixel is read (``auto/inputs.py``); ``read_input`` then reads
what was probed. Every problem with an input a request named (missing, not an image, not one regular DICOM volume,
not 3D) is a ``BadInput`` (HTTP 400) that says which input and what is wrong.

Which files are read at all: ``formats.identify`` on every image file (NIfTI, NRRD and MetaImage holding their own
data, DICOM; everything else 400), which is then read with the ITK reader it was checked as. The paths given here
are the server's private copies of what a request named (``paths.ConfinedFiles.read``), or a command user's own.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..validate import BadInput
from . import formats

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


@dataclass
class Input:
    """One input as its header declares it, before any pixel is read: SimpleITK's ``size`` (i, j, k) and geometry,
    the bytes of a voxel as read, and for a DICOM series its checked ``dicomseries.Volume`` (files in slice order)."""

    path: str
    name: str  # as the request names it (messages name no server path)
    size: tuple
    pixel_bytes: int
    imageio: Optional[str] = None  # the ITK reader it was checked for (formats.IMAGEIO); None for a DICOM series
    spacing: Optional[tuple] = None
    origin: Optional[tuple] = None
    direction: Optional[tuple] = None
    dicom: "Optional[object]" = None  # dicomseries.Volume

    @property
    def voxels(self):
        return int(np.prod(self.size, dtype=object))

    @property
    def nbytes(self):
        return self.voxels * self.pixel_bytes

    @property
    def shape(self):
        """``[k, j, i]``, the array's shape."""
        return list(reversed(self.size))

    @property
    def notes(self):
        return list(self.dicom.notes) if self.dicom is not None else []

    def same_grid(self, other, tol=1e-5):
        return self.path == other.path or (
            self.spacing is not None and other.spacing is not None and tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, atol=tol) and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol))


def _pixel_bytes(pixel_id):
    """Bytes of one component of SimpleITK pixel type ``pixel_id``."""
    sitk = _sitk()
    try:
        return int(sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], pixel_id)).dtype.itemsize)
    except (RuntimeError, TypeError):
        return 8


def probe_image(path, name=None):
    """The ``Input`` of one image file (an accepted format: ``formats.identify``) from its header alone
    (``ImageFileReader.ReadImageInformation``, with the reader of that format)."""
    sitk = _sitk()
    name = name or path
    if not os.path.exists(path):
        raise BadInput("input %s does not exist" % name)
    if os.path.isdir(path):
        raise BadInput("input %s is a folder; a folder is read as a DICOM series only when is_dicom is set" % name)
    imageio = formats.IMAGEIO[formats.identify(path, name)]
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO(imageio)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise BadInput("input %s cannot be read as an image: %s" % (name, _first_line(exc)))
    if reader.GetDimension() != 3:
        raise BadInput("%s is a %dD image; automatic models take 3D volumes" % (name, reader.GetDimension()))
    if reader.GetNumberOfComponents() != 1:
        raise BadInput("%s has %d components per voxel; give one volume per series (one channel each)"
                       % (name, reader.GetNumberOfComponents()))
    return Input(path=path, name=name, size=tuple(int(s) for s in reader.GetSize()),
                 pixel_bytes=_pixel_bytes(reader.GetPixelID()), imageio=imageio, spacing=tuple(reader.GetSpacing()),
                 origin=tuple(reader.GetOrigin()), direction=tuple(reader.GetDirection()))


def probe_series(path, is_dicom=False, bvalue=None, name=None):
    """The ``Input`` of a DICOM series (``is_dicom`` and ``path`` a folder: its headers checked by
    ``dicomseries``; ``bvalue``: the request's ``bvalue_for_filtering``) or of an image file (also when
    ``is_dicom``: a file is read as the image it is, as the established server does)."""
    from . import dicomseries

    name = name or path
    if is_dicom and os.path.isdir(path):
        vol = dicomseries.series_volume(path, bvalue=bvalue, name=name)
        return Input(path=path, name=name, size=vol.size, pixel_bytes=4 if vol.float_output else vol.pixel_bytes,
                     spacing=vol.spacing, origin=vol.origin, direction=vol.direction, dicom=vol)
    if not os.path.exists(path):
        raise BadInput("series %s does not exist" % name)
    return probe_image(path, name=name)


def read_input(info):
    """Read a probed ``Input``: a ``Series`` (for DICOM, exactly the files the checks kept, in slice order)."""
    sitk = _sitk()
    if info.dicom is not None:
        files = list(info.dicom.files)
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO(formats.IMAGEIO[formats.DICOM])
        reader.SetFileNames(files)
        if info.dicom.float_output:  # the files rescale differently: one output type that holds every slice
            reader.SetOutputPixelType(sitk.sitkFloat32)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise BadInput("the DICOM series in %s cannot be read: %s" % (info.name, _first_line(exc)))
        series = Series(path=info.path, image=image, files=files, series_uid=info.dicom.series_uid)
    else:
        try:
            image = sitk.ReadImage(info.path, imageIO=info.imageio or "")
        except RuntimeError as exc:
            raise BadInput("input %s cannot be read as an image: %s" % (info.name, _first_line(exc)))
        series = Series(path=info.path, image=image)
    _check_3d(image, info.name)
    if tuple(image.GetSize()) != tuple(info.size):
        raise BadInput("input %s changed while it was read (its header said %s, its data %s)"
                       % (info.name, list(info.size), list(image.GetSize())))
    return series


def read_image(path):
    """Read one image file (header checked first: ``probe_image``)."""
    return read_input(probe_image(path))


def read_series(path, is_dicom=False, bvalue=None):
    """Read a DICOM series or an image file (``probe_series``, then ``read_input``)."""
    return read_input(probe_series(path, is_dicom, bvalue=bvalue))


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
    """Half-open ``[(lo, hi), ...]`` per axis of the nonzero voxels of ``mask`` (numpy), or None when empty. From
    the mask's projections on each axis: no index arrays (``np.nonzero`` of a full mask takes 24 bytes a voxel)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box


def padded_bbox(bbox, padding, shape):
    """``bbox`` grown by ``padding`` voxels per axis and clipped to ``shape``."""
    return [(max(0, lo - int(p)), min(int(n), hi + int(p))) for (lo, hi), p, n in zip(bbox, padding, shape)]
