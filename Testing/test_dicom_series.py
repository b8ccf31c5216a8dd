"""DICOM series checked before they are read (``auto/dicomseries.py``, ``io.probe_series`` / ``io.read_input``):
series that form one regular volume read with their exact geometry (oblique, anisotropic, files named out of
order); series that do not are refused with a 400 naming the series and the reason (repeated or missing positions,
several orientations, sizes, pixel spacings, echoes, time points, acquisitions, b-values, a sheared stack), or give
the sub-volume the request selects (``bvalue_for_filtering``, as nnunet-serve: the closest b-value, the standard
and the vendors' tags); localizers and copied files are left out with a note. Header bombs are refused before a
pixel is read. The series are written here with pydicom (``dicom_synth.py``); the end-to-end tests run the real
nnU-Net with a tiny random model (``run_study``) and read the DICOM SEG back with highdicom.
"""

import os
import shutil

import numpy as np
import pytest

import dicom_synth as ds
import tiny_nnunet
from nninteractive_slicer_server.auto import io as aio
from nninteractive_slicer_server.auto.pipeline import run_study
from nninteractive_slicer_server.auto.predictors import AutoSegmenter
from nninteractive_slicer_server.auto.registry import load_registry
from nninteractive_slicer_server.errors import TooLarge
from nninteractive_slicer_server.limits import Limits
from nninteractive_slicer_server.validate import BadInput

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

SHAPE = (12, 10, 14)  # [k, j, i]: slices, rows, columns
ROW = ds.unit([np.cos(0.4), np.sin(0.4), 0.2])  # oblique, turned and tilted
COL = ds.unit(np.cross(ds.unit([0.15, -0.1, 1.0]), ROW))
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([-20.25, 7.5, 33.0])
PIXEL_SPACING = (0.7, 1.1)  # rows apart, columns apart
SLICE = 3.0
GEOMETRY = dict(origin=ORIGIN, row=ROW, col=COL, pixel_spacing=PIXEL_SPACING, slice_spacing=SLICE)


def stack(folder, volume=None, **kw):
    return ds.write_stack(str(folder), ds.volume(SHAPE) if volume is None else volume, **dict(GEOMETRY, **kw))


def probe(folder, bvalue=None):
    return aio.probe_series(str(folder), is_dicom=True, bvalue=bvalue, name=os.path.basename(str(folder)))


def read(folder, bvalue=None):
    info = probe(folder, bvalue)
    return info, aio.read_input(info)


def assert_volume(image, vol, origin=ORIGIN):
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), vol)
    np.testing.assert_allclose(image.GetSpacing(), (PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.stack([ROW, COL, NORMAL], axis=1),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- volumes

def test_oblique_anisotropic_series_reads_in_slice_order(tmp_path):
    vol = ds.volume(SHAPE)
    files = stack(tmp_path / "s", vol)
    info, series = read(tmp_path / "s")
    assert info.size == (SHAPE[2], SHAPE[1], SHAPE[0]) and info.pixel_bytes == 2 and info.notes == []
    assert info.voxels == int(np.prod(SHAPE)) and info.shape == list(SHAPE)
    assert series.files == [p for p, _u, _i in files]  # slice order, not name order
    assert_volume(series.image, vol)
    # the geometry the headers gave is SimpleITK's
    np.testing.assert_allclose(info.spacing, series.image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(info.direction, series.image.GetDirection(), atol=1e-5)


def test_a_copied_file_is_read_once(tmp_path):
    vol = ds.volume(SHAPE)
    files = stack(tmp_path / "s", vol)
    shutil.copy(files[4][0], str(tmp_path / "s" / "copy_of_slice_4.dcm"))
    info, series = read(tmp_path / "s")
    assert_volume(series.image, vol)
    assert any("1 file(s) repeat an image" in n for n in info.notes)


def test_localizers_are_left_out(tmp_path):
    vol = ds.volume(SHAPE)
    files = stack(tmp_path / "s", vol)
    ids = ds.SeriesIds(series=pydicom.dcmread(files[0][0]).SeriesInstanceUID)
    for n in range(2):  # two scouts in the series: another orientation and size
        ds.write_slice(str(tmp_path / "s" / ("scout%d.dcm" % n)), np.ones((20, 20)), ids, ipp=[0, 0, 0],
                       iop=[1, 0, 0, 0, 0, -1], pixel_spacing=(2, 2), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    info, series = read(tmp_path / "s")
    assert_volume(series.image, vol)
    assert any("2 localizer image(s)" in n for n in info.notes)


def test_files_without_preamble_and_other_files_in_the_folder(tmp_path):
    """Old files (no preamble, no file meta: what GDCM reads too) among a text file, random bytes and a folder."""
    from pydicom.dataset import Dataset
    from pydicom.filewriter import dcmwrite

    vol = ds.volume(SHAPE)
    for path, _u, _i in stack(tmp_path / "s", vol):
        bare = Dataset()
        bare.update(pydicom.dcmread(path))
        dcmwrite(path, bare, implicit_vr=True, little_endian=True)
    (tmp_path / "s" / "README.txt").write_text("not an image\n" * 40)
    (tmp_path / "s" / "junk.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "s" / "sub").mkdir()
    assert_volume(read(tmp_path / "s")[1].image, vol)


def test_acquisitions_that_do_not_repeat_positions_are_one_volume(tmp_path):
    vol = ds.volume(SHAPE)  # axial CT scanned rotation by rotation: each rotation its own AcquisitionNumber
    stack(tmp_path / "s", vol, per_slice=lambda k: {"AcquisitionNumber": 1 + k // 4})
    assert_volume(read(tmp_path / "s")[1].image, vol)


def test_slices_that_rescale_differently_read_as_float(tmp_path):
    vol = ds.volume(SHAPE)
    stack(tmp_path / "s", vol, per_slice=lambda k: {"RescaleSlope": 1 if k < 6 else 0.5, "RescaleIntercept": -10})
    info, series = read(tmp_path / "s")
    expected = vol.astype(np.float32) * np.where(np.arange(SHAPE[0]) < 6, 1.0, 0.5)[:, None, None] - 10
    assert series.image.GetPixelID() == sitk.sitkFloat32 and info.pixel_bytes == 4
    np.testing.assert_allclose(sitk.GetArrayFromImage(series.image), expected)


@pytest.mark.parametrize("tag", ["standard", "siemens", "ge"])
@pytest.mark.parametrize("wanted,read_b", [(900, 1000), (0, 0), (750, 500), (5000, 1000)])
def test_bvalue_for_filtering_selects_the_closest_b_value(tmp_path, tag, wanted, read_b):
    bvalues = (0, 500, 1000)
    vols = {b: ds.volume(SHAPE, seed=b) for b in bvalues}
    ids = ds.SeriesIds()
    for b in bvalues:
        if tag == "standard":
            attrs = {"DiffusionBValue": float(b)}
        elif tag == "siemens":
            attrs = {"private": {(0x0019, 0x0010): ("LO", "SIEMENS MR HEADER"), (0x0019, 0x100C): ("IS", str(b))}}
        else:  # GE: the b-value plus 10^9, then the gradient's numbers
            attrs = {"private": {(0x0043, 0x0010): ("LO", "GEMS_PARM_01"),
                                 (0x0043, 0x1039): ("IS", ["%d" % (1000000000 + b), "8", "0", "0"])}}
        stack(tmp_path / "dwi", vols[b], ids=ids, prefix="B%d_" % b, **attrs)
    with pytest.raises(BadInput, match=r"dwi .*holds 3 b-values \(0: 12 file\(s\), 500: 12 file\(s\), 1000: 12 "
                                       r"file\(s\)\); set bvalue_for_filtering"):
        probe(tmp_path / "dwi")
    info, series = read(tmp_path / "dwi", bvalue=wanted)
    assert_volume(series.image, vols[read_b])
    assert any("b-value %d were read" % read_b in n for n in info.notes)
    assert all("B%d_" % read_b in os.path.basename(f) for f in series.files)


# ---------------------------------------------------------------------------------------------------------- refused

def _ids_of(files):
    return ds.SeriesIds(study=pydicom.dcmread(files[0][0]).StudyInstanceUID,
                        series=pydicom.dcmread(files[0][0]).SeriesInstanceUID)


def repeated_position(folder):
    files = stack(folder)
    ds.write_slice(str(folder / "again.dcm"), ds.volume(SHAPE)[3], _ids_of(files), ipp=files[3][2],
                   iop=list(ROW) + list(COL), pixel_spacing=PIXEL_SPACING)


def missing_slice(folder):
    files = stack(folder)
    os.remove(files[5][0])


def irregular_spacing(folder):
    stack(folder, per_slice=lambda k: {"ipp": ORIGIN + (k * SLICE + (1.0 if k > 7 else 0.0)) * NORMAL})


def second_orientation(folder):
    files = stack(folder)
    for n in range(3):  # a few coronal slices in the series, not marked as localizers
        ds.write_slice(str(folder / ("cor%d.dcm" % n)), ds.volume(SHAPE)[n], _ids_of(files), ipp=[0, n, 0],
                       iop=[1, 0, 0, 0, 0, -1], pixel_spacing=PIXEL_SPACING)


def second_size(folder):
    files = stack(folder)
    os.remove(files[-1][0])
    ds.write_slice(str(folder / "big.dcm"), np.zeros((SHAPE[1] + 2, SHAPE[2])), _ids_of(files), ipp=files[-1][2],
                   iop=list(ROW) + list(COL), pixel_spacing=PIXEL_SPACING)


def second_pixel_spacing(folder):
    stack(folder, per_slice=lambda k: {"PixelSpacing": [0.7, 1.1] if k < 6 else [0.8, 1.1]})


def two_echoes(folder):
    ids = ds.SeriesIds()
    for echo in (1, 2):
        stack(folder, ids=ids, prefix="E%d_" % echo, EchoNumbers=echo, EchoTime=10.0 * echo)


def time_points(folder):
    ids = ds.SeriesIds()
    for t in (1, 2, 3):
        stack(folder, ids=ids, prefix="T%d_" % t, TemporalPositionIdentifier=t)


def acquisitions(folder):
    ids = ds.SeriesIds()
    for a in (1, 2):
        stack(folder, ids=ids, prefix="A%d_" % a, AcquisitionNumber=a)


def gantry_tilt(folder):  # a CT tilted by 15 degrees: each slice shifted along the column direction
    shift = SLICE * np.tan(np.radians(15.0))
    stack(folder, per_slice=lambda k: {"ipp": ORIGIN + k * SLICE * NORMAL + k * shift * COL,
                                       "GantryDetectorTilt": 15.0})


def only_localizers(folder):
    stack(folder, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])


def no_positions(folder):
    stack(folder, per_slice=lambda k: {"ipp": None} if k == 2 else {})


@pytest.mark.parametrize("make,match", [
    (repeated_position, r"has 1 file\(s\) at a position already taken \(e.g. IM0008.dcm and again.dcm"),
    (missing_slice, r"is not evenly spaced: slices 4 and 5 are 6.000 mm apart where the spacing is 3.000 mm "
                    r"\(slices missing\?\)"),
    (irregular_spacing, r"is not evenly spaced: slices 7 and 8 are 4.000 mm apart"),
    (second_orientation, r"holds slices in 2 orientations \(axial: 12 file\(s\), coronal: 3 file\(s\)\)"),
    (second_size, r"holds 2 sizes \(Rows x Columns\) \(10x14: 11 file\(s\), 12x14: 1 file\(s\)\)"),
    (second_pixel_spacing, r"holds slices of several pixel spacings \(0.7x1.1, 0.8x1.1\)"),
    (two_echoes, r"holds 2 echoes \(EchoNumbers 1: 12 file\(s\), 2: 12 file\(s\)\); put each echo"),
    (time_points, r"holds 3 time points \(TemporalPositionIdentifier 1, 2, 3\) at 12 slice positions"),
    (acquisitions, r"holds 2 acquisitions \(AcquisitionNumber 1, 2\) at 12 slice positions"),
    (gantry_tilt, r"is not stacked along its slices' normal: slice 11 lies 8.84 mm to the side of the first one "
                  r"over 33.00 mm \(a sheared stack: gantry tilt of 15.0 degrees; GantryDetectorTilt 15\); "
                  r"resample it"),
    (only_localizers, r"holds only localizer images"),
    (no_positions, r"has 1 file\(s\) without ImagePositionPatient"),
])
def test_series_that_are_not_one_regular_volume_are_refused(tmp_path, make, match):
    folder = tmp_path / "s"
    folder.mkdir()
    make(folder)
    with pytest.raises(BadInput, match=r"the DICOM series in s \(SeriesInstanceUID [0-9.]+\) " + match):
        probe(folder)


def test_header_bomb_is_refused_before_a_pixel_is_read(tmp_path, registry):
    """Three files whose headers declare 30000 x 30000 slices, holding a few bytes of pixels."""
    folder = tmp_path / "study" / "bomb"
    ids = ds.SeriesIds()
    for k in range(3):
        path = str(folder / ("b%d.dcm" % k))
        os.makedirs(str(folder), exist_ok=True)
        ds.write_slice(path, np.zeros((4, 4)), ids, ipp=[0, 0, k], iop=[1, 0, 0, 0, 1, 0], pixel_spacing=(1, 1))
        d = pydicom.dcmread(path)
        d.Rows = d.Columns = 30000
        d.save_as(path)
    info = probe(folder)
    assert info.size == (30000, 30000, 3) and info.voxels == 2700000000
    limits = Limits.defaults(memory_budget=1 << 30, max_image_voxels=10 ** 6)
    with pytest.raises(TooLarge, match=r"the image of input 'bomb' \[3, 30000, 30000\] has 2700000000 voxels; this "
                                        r"server accepts at most 1000000 \(--max-image-voxels\)"):
        run_study(registry["registry"], registry["seg"], {
            "nnunet_id": "tiny", "study_path": str(tmp_path / "study"), "series_folders": ["bomb"], "is_dicom": True,
            "output_dir": str(tmp_path / "out")}, limits=limits)


# ---------------------------------------------------------------------------------------------------------- run_study

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomseries")
    tiny_nnunet.make_tiny_nnunet(str(root / "models"))
    reg = load_registry(tiny_nnunet.write_spec(str(root / "spec.yaml"), str(root / "models")))
    return {"registry": reg, "seg": AutoSegmenter(reg, device="cpu")}


def test_run_on_the_selected_b_value_writes_its_seg_on_those_files(tmp_path, registry):
    ids = ds.SeriesIds()
    vols, files = {}, {}
    for b in (0, 1000):
        vols[b] = ds.volume(SHAPE, seed=b) * (1 + b // 500)
        files[b] = stack(tmp_path / "study" / "dwi", vols[b], ids=ids, prefix="B%d_" % b, DiffusionBValue=float(b))
    request = {"nnunet_id": "tiny", "study_path": str(tmp_path / "study"), "series_folders": ["dwi"],
               "is_dicom": True, "output_dir": str(tmp_path / "out"), "save_nifti_inputs": True}
    with pytest.raises(BadInput, match=r"dwi .*holds 2 b-values"):
        run_study(registry["registry"], registry["seg"], request)
    r = run_study(registry["registry"], registry["seg"], dict(request, bvalue_for_filtering=800))
    assert r["request"]["bvalue_for_filtering"] == 800
    assert any("b-value 1000 were read" in w for w in r["warnings"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(r["nifti_inputs"][0])), vols[1000])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(r["nifti_prediction"][0]))
    seg = hd.seg.segread(r["dicom_segmentation"][0])
    by_uid = {uid: k for k, (_p, uid, _i) in enumerate(files[1000])}
    referenced = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for item in seg.PerFrameFunctionalGroupsSequence}
    assert referenced and referenced <= set(by_uid)  # only the b=1000 files, each frame on its own slice
    assert referenced == {files[1000][k][1] for k in range(SHAPE[0]) if labels[k].any()}


def test_a_refused_series_names_itself_in_the_run(tmp_path, registry):
    folder = tmp_path / "study" / "t2_dual"
    folder.mkdir(parents=True)
    two_echoes(folder)
    with pytest.raises(BadInput, match=r"t2_dual .*holds 2 echoes"):
        run_study(registry["registry"], registry["seg"], {
            "nnunet_id": "tiny", "study_path": str(tmp_path / "study"), "series_folders": ["t2_dual"],
            "is_dicom": True, "output_dir": str(tmp_path / "out")})
    assert not (tmp_path / "out" / "stage_0").exists()  # refused before anything ran
