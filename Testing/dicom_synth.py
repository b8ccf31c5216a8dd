"""Synthetic DICOM series for tests, written with pydicom: a regular stack of slices at any orientation and spacing,
and every per-slice attribute a test may want to break (positions, orientation, size, echo, b-value in the standard
or a vendor's tag, temporal position, acquisition, image type, rescale, frames).

    files = write_stack(folder, volume, origin=..., row=..., col=..., pixel_spacing=(r, c), slice_spacing=s)
    write_slice(path, pixels, series, ipp=..., iop=..., pixel_spacing=..., **attributes)

``volume`` is ``[k, j, i]`` (slice, row, column); slice ``k`` lies at ``origin + k * slice_spacing * normal`` with
``normal = row x col``. File names run backwards (slice 0 is the last name), so reading by name is wrong.
"""

import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SeriesIds:
    """The UIDs slices of one series share."""

    study: str = field(default_factory=lambda: _uid())
    series: str = field(default_factory=lambda: _uid())
    frame: str = field(default_factory=lambda: _uid())


def _uid():
    from pydicom.uid import generate_uid

    return generate_uid()


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def write_slice(path, pixels, ids, ipp, iop, pixel_spacing, modality="MR", sop_uid=None, private=None, **attributes):
    """One single-frame image file. ``pixels``: ``[rows, cols]`` int16 (or ``[frames, rows, cols]`` with
    ``NumberOfFrames``); ``attributes``: DICOM keywords set on the dataset (None removes one); ``private``:
    ``{(group, element): (VR, value)}``. Returns the SOPInstanceUID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    pixels = np.ascontiguousarray(pixels, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid = sop_uid or _uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Series", "P002", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = ids.study, ids.series, ids.frame
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A2"
    ds.ReferringPhysicianName, ds.Manufacturer, ds.Modality, ds.SeriesNumber = "", "tests", modality, 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    if ipp is not None:
        ds.ImagePositionPatient = [float("%.5f" % v) for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [float("%.7f" % v) for v in iop]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    for key, value in attributes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    for tag, (vr, value) in (private or {}).items():
        ds.add_new(tag, vr, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return uid


def write_stack(folder, volume, origin=(0.0, 0.0, 0.0), row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0),
                pixel_spacing=(1.0, 1.0), slice_spacing=1.0, ids=None, per_slice=None, prefix="IM", **attributes):
    """Write ``volume`` ``[k, j, i]`` as one series; ``per_slice(k)`` gives more attributes (and ``ipp``, ``iop``,
    ``private``, ``sop_uid``) for slice ``k``. Returns ``[(path, sop_uid, ipp)]`` in slice order."""
    os.makedirs(folder, exist_ok=True)
    ids = ids or SeriesIds()
    row, col = unit(row), unit(col)
    normal = np.cross(row, col)
    n = volume.shape[0]
    out = []
    for k in range(n):
        extra = dict(attributes, InstanceNumber=k + 1)
        extra.update(per_slice(k) if per_slice else {})
        ipp = extra.pop("ipp", np.asarray(origin, dtype=float) + k * slice_spacing * normal)
        iop = extra.pop("iop", list(row) + list(col))
        path = os.path.join(folder, "%s%04d.dcm" % (prefix, n - 1 - k))
        extra.setdefault("SliceThickness", slice_spacing)
        uid = write_slice(path, volume[k], ids, ipp, iop, pixel_spacing, **extra)
        out.append((path, uid, None if ipp is None else [float("%.5f" % v) for v in ipp]))
    return out


def volume(shape, seed=0):
    """A deterministic int16 volume whose every slice differs."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, 400, size=shape).astype(np.int16)
    vol += (100 * np.arange(shape[0]))[:, None, None].astype(np.int16)
    return vol
