"""Automatic segmentation, study in -> outputs: DICOM series and NIfTI / NRRD files in, NIfTI, DICOM SEG (binary and
fractional) and RTSTRUCT out, probability maps, class subsets, two-model cascades (crop and intersect), the
``nnunet-predict`` / ``nnunet-predict-batch`` commands and bad requests (``auto/pipeline.py``, ``io.py``,
``dicomseg.py``, ``predict_cli.py``).

Everything runs the real nnU-Net on the CPU with tiny random-weight models the tests build
(Testing/models/tiny_nnunet.py): they predict speckled labels, which is what geometry, label and cascade checks need.
The DICOM CT series is written here with pydicom: oblique direction cosines, anisotropic spacing, files named in an
order that is not the slice order. DICOM SEGs are read back with highdicom and checked frame by frame against their
source slices and against prediction.nii.gz.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_nnunet
from nninteractive_slicer_server.auto import dicomseg
from nninteractive_slicer_server.auto.pipeline import keep_intersecting, run_study
from nninteractive_slicer_server.auto.predictors import AutoSegmenter
from nninteractive_slicer_server.auto.registry import UnknownModel, load_registry
from nninteractive_slicer_server.validate import BadInput

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "server"),
                                                   os.path.join(REPO, "SlicerNNInteractive"),
                                                   os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="2")

# The CT series: 20 slices of 36 rows x 44 columns; rows 0.9 mm apart, columns 1.3 mm, slices 2.5 mm.
SHAPE = (20, 36, 44)
ROW_SPACING, COL_SPACING, SLICE_SPACING = 0.9, 1.3, 2.5


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


# Oblique: the row direction turned about z and tilted, the column direction orthogonal to it.
ROW_COS = _unit([np.cos(0.3), np.sin(0.3), 0.15])
COL_COS = _unit(np.cross(_unit([0.1, -0.2, 1.0]), ROW_COS))
NORMAL = np.cross(ROW_COS, COL_COS)
ORIGIN = np.array([-31.5, 12.25, 101.0])


def phantom(shape=SHAPE, seed=0):
    """A smooth volume with two bright ellipsoids (HU-like values), deterministic."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    vol = -100 + 40 * rng.standard_normal(shape)
    vol += 300 * (((k - 0.1) / 0.5) ** 2 + ((j + 0.2) / 0.4) ** 2 + ((i + 0.3) / 0.35) ** 2 < 1)
    vol += 150 * (((k + 0.2) / 0.4) ** 2 + ((j - 0.3) / 0.3) ** 2 + ((i - 0.4) / 0.3) ** 2 < 1)
    return vol.astype(np.int16)


def write_ct_series(folder, volume=None):
    """Write ``volume`` ([k, j, i]) as a CT series; returns the per-slice (file, SOPInstanceUID, IPP) in slice order.
    The files are named in reverse slice order, so reading them by name would put the slices upside down."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    volume = phantom() if volume is None else volume
    os.makedirs(folder, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    n = volume.shape[0]
    for k in range(n):
        ipp = ORIGIN + k * SLICE_SPACING * NORMAL
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(folder, "IM%04d.dcm" % (n - 1 - k))
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "P001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "tests"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, k + 1
        ds.ImageOrientationPatient = [float("%.6f" % v) for v in list(ROW_COS) + list(COL_COS)]
        ds.ImagePositionPatient = [float("%.4f" % v) for v in ipp]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.SliceThickness = SLICE_SPACING
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(volume[k]).tobytes()
        ds.save_as(path, enforce_file_format=True)
        out.append((path, uid, [float(v) for v in ds.ImagePositionPatient]))
    return out


def oblique_image(volume):
    img = sitk.GetImageFromArray(volume.astype(np.float32))
    img.SetSpacing((COL_SPACING, ROW_SPACING, SLICE_SPACING))
    img.SetOrigin(tuple(ORIGIN))
    img.SetDirection(tuple(np.stack([ROW_COS, COL_COS, NORMAL], axis=1).ravel()))
    return img


# ---------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoio")
    folder = str(root / "models")
    tiny_nnunet.make_tiny_nnunet(folder)
    tiny_nnunet.make_tiny_nnunet(folder, labels=("lesion",), dataset_name="Dataset997_TinyLesion", seed=3)
    tiny_nnunet.make_tiny_nnunet(folder, channels=("T2", "ADC"), dataset_name="Dataset996_TinyTwo", seed=5)
    spec = str(root / "model-serve-spec.yaml")
    tiny_nnunet.write_spec(spec, folder)
    with open(spec) as f:
        import yaml

        data = yaml.safe_load(f)
    data["models"] += [
        {"id": "tiny_lesion", "rel_path": "Dataset997_TinyLesion", "name": "Tiny lesion",
         "metadata": {"algorithm_name": "LesionNet", "segment_names": [{"name": "Lesion", "code": "52988006",
                                                                        "category_number": "49755003"}]}},
        {"id": "tiny_two", "rel_path": "Dataset996_TinyTwo"}]
    with open(spec, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    study = root / "study"
    slices = write_ct_series(str(study / "ct"))
    vol = phantom()
    nii = oblique_image(vol)
    sitk.WriteImage(nii, str(study / "ct.nii.gz"))
    sitk.WriteImage(nii, str(study / "ct.nrrd"))
    # a second series on another grid (half the resolution in-plane), for two-channel models
    second = sitk.Resample(nii, [22, 18, 20], sitk.Transform(), sitk.sitkLinear, nii.GetOrigin(),
                           (COL_SPACING * 2, ROW_SPACING * 2, SLICE_SPACING), nii.GetDirection(), 0.0,
                           sitk.sitkFloat32)
    sitk.WriteImage(second, str(study / "adc.nii.gz"))
    registry = load_registry(spec)
    seg = AutoSegmenter(registry, device="cpu")
    return {"root": root, "study": str(study), "slices": slices, "registry": registry, "seg": seg, "spec": spec,
            "nii": nii}


def run(env, out, **fields):
    req = {"study_path": env["study"], "output_dir": str(env["root"] / out)}
    req.update(fields)
    return run_study(env["registry"], env["seg"], req)


def read(path):
    img = sitk.ReadImage(path)
    return img, sitk.GetArrayFromImage(img)


def assert_same_geometry(a, b, tol=1e-5):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


# ---------------------------------------------------------------------------------------------------------- DICOM

def test_dicom_series_to_seg_on_source_slices(env):
    r = run(env, "dcm", nnunet_id="tiny", series_folders=["ct"], is_dicom=True, save_nifti_inputs=True)
    assert r["status"] == "done" and r["error"] is None and r["is_empty"] == [False]
    assert r["nnunet_path"] == ["Dataset998_TinyOrgans/nnUNetTrainer__nnUNetPlans__3d_fullres"]
    assert r["request"]["nnunet_id"] == ["tiny_organs"]
    assert os.path.basename(r["nifti_prediction"][0]) == "prediction.nii.gz"
    assert r["nifti_prediction"][0].endswith(os.path.join("dcm", "stage_0", "prediction.nii.gz"))
    # the series as read: SimpleITK's slice order (along the normal), whatever the file names
    pred_img, labels = read(r["nifti_prediction"][0])
    assert labels.shape == SHAPE and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_allclose(pred_img.GetOrigin(), env["slices"][0][2], atol=1e-3)
    np.testing.assert_allclose(pred_img.GetSpacing(), (COL_SPACING, ROW_SPACING, SLICE_SPACING), atol=1e-4)
    np.testing.assert_allclose(np.reshape(pred_img.GetDirection(), (3, 3)),
                               np.stack([ROW_COS, COL_COS, NORMAL], axis=1), atol=1e-5)
    inp, inp_arr = read(r["nifti_inputs"][0])
    np.testing.assert_array_equal(inp_arr, phantom())
    assert_same_geometry(inp, pred_img)

    seg = hd.seg.segread(r["dicom_segmentation"][0])
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    assert [s.TrackingID for s in seg.SegmentSequence] == ["label 1", "label 2"]
    liver = seg.SegmentSequence[0]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert liver.SegmentAlgorithmName == "TinyOrgans"
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(liver.RecommendedDisplayCIELabValue)).to_rgb()
    np.testing.assert_allclose(rgb, (216, 101, 79), atol=2)
    assert seg.StudyInstanceUID == pydicom.dcmread(env["slices"][0][0]).StudyInstanceUID
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in iop], list(ROW_COS) + list(COL_COS), atol=1e-5)
    # every frame on its source slice, holding that slice's labels
    by_uid = {uid: (k, ipp) for k, (_p, uid, ipp) in enumerate(env["slices"])}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    seen = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k, ipp = by_uid[src]
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], ipp,
                                   atol=1e-3)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frames[f].astype(bool), labels[k] == number)
        seen.add((k, number))
    expected = {(k, v) for k in range(SHAPE[0]) for v in (1, 2) if (labels[k] == v).any()}
    assert seen == expected


def test_dicom_probability_map_as_fractional_seg(env):
    r = run(env, "dcmfrac", nnunet_id="tiny", series_folders=["ct"], is_dicom=True, class_idx=2,
            proba_threshold=0.4, save_proba_map=True)
    _img, labels = read(r["nifti_prediction"][0])
    pimg, probs = read(r["nifti_proba"][0])
    assert set(np.unique(labels)) <= {0, 2} and (labels == 2).any()
    assert pimg.GetNumberOfComponentsPerPixel() == 1
    assert np.all(probs[labels == 0] == 0) and np.all(probs[labels == 2] > 0.4)
    frac = hd.seg.segread(r["dicom_fractional_segmentation"][0])
    assert frac.SegmentationType == "FRACTIONAL" and frac.SegmentationFractionalType == "PROBABILITY"
    assert [s.SegmentLabel for s in frac.SegmentSequence] == ["spleen"]
    by_uid = {uid: k for k, (_p, uid, _i) in enumerate(env["slices"])}
    stored = frac.pixel_array if frac.pixel_array.ndim == 3 else frac.pixel_array[None]
    for f, item in enumerate(frac.PerFrameFunctionalGroupsSequence):
        k = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(stored[f] / 255.0, probs[k], atol=1 / 255.0 + 1e-6)
    binary = hd.seg.segread(r["dicom_segmentation"][0])
    assert [s.SegmentLabel for s in binary.SegmentSequence] == ["spleen"]


@pytest.mark.skipif(not dicomseg.rtstruct_available(), reason="rt-utils is not installed (optional extra rtstruct)")
def test_rtstruct_contours_on_their_slices(env):
    r = run(env, "rt", nnunet_id="tiny", series_folders=["ct"], is_dicom=True, save_rt_struct_output=True,
            class_idx=1, proba_threshold=0.5)
    ds = pydicom.dcmread(r["dicom_struct"][0])
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["liver"]
    positions = np.array([ipp for _p, _u, ipp in env["slices"]]) @ NORMAL
    contours = ds.ROIContourSequence[0].ContourSequence
    assert len(contours) > 0
    for c in contours:
        pts = np.reshape([float(v) for v in c.ContourData], (-1, 3))
        d = pts @ NORMAL
        assert np.ptp(d) < 1e-2 and np.min(np.abs(positions - d[0])) < 1e-2  # planar, on a slice


def test_rtstruct_missing_says_how_to_install(env, monkeypatch):
    monkeypatch.setattr(dicomseg, "rtstruct_available", lambda: False)
    with pytest.raises(BadInput, match=r"rt-utils.*\[rtstruct\]"):
        run(env, "nort", nnunet_id="tiny", series_folders=["ct"], is_dicom=True, save_rt_struct_output=True)


# ---------------------------------------------------------------------------------------------------------- NIfTI

@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nrrd"])
def test_file_geometry_preserved(env, name):
    r = run(env, "file_" + name.replace(".", "_"), nnunet_id="tiny_organs", series_folders=[name], suffix="v1")
    assert r["nifti_prediction"][0].endswith("prediction_v1.nii.gz")
    assert "dicom_segmentation" not in r
    src = sitk.ReadImage(os.path.join(env["study"], name))
    out, labels = read(r["nifti_prediction"][0])
    assert_same_geometry(out, src, tol=1e-6)
    assert_same_geometry(out, env["nii"], tol=1e-5)  # and the geometry the test wrote
    assert labels.shape == SHAPE and labels.any()


def test_second_series_resampled_to_the_first(env):
    r = run(env, "two", nnunet_id="tiny_two", series_folders=["ct.nii.gz", "adc.nii.gz"], save_nifti_inputs=True)
    first, _ = read(r["nifti_inputs"][0])
    second, arr = read(r["nifti_inputs"][1])
    assert_same_geometry(second, first)
    assert arr.shape == SHAPE
    assert_same_geometry(read(r["nifti_prediction"][0])[0], env["nii"])


def test_probability_maps_per_label(env):
    r = run(env, "proba", nnunet_id="tiny", series_folders=["ct.nii.gz"], proba_threshold=0.3, save_proba_map=True)
    _i, labels = read(r["nifti_prediction"][0])
    pimg, probs = read(r["nifti_proba"][0])
    assert pimg.GetNumberOfComponentsPerPixel() == 2  # liver, spleen
    assert_same_geometry(pimg, env["nii"])
    for c, v in enumerate((1, 2)):
        assert np.all(probs[..., c][labels != v] == 0)
        assert np.all(probs[..., c][labels == v] > 0.3)


def test_class_subset(env):
    r = run(env, "subset", nnunet_id="tiny", series_folders=["ct.nii.gz"], class_idx=[2])
    _i, labels = read(r["nifti_prediction"][0])
    assert set(np.unique(labels)) == {0, 2}
    assert [s["name"] for s in r["stages"][0]["labels"]] == ["spleen"]


# ---------------------------------------------------------------------------------------------------------- cascades

def _box_mask(env, name, box):
    arr = np.zeros(SHAPE, dtype=np.uint8)
    arr[tuple(slice(a, b) for a, b in box)] = 1
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(env["nii"])
    path = os.path.join(env["study"], name)
    sitk.WriteImage(img, path)
    return path, arr.astype(bool)


def test_crop_from_runs_on_the_padded_box_and_puts_it_back(env):
    path, _ = _box_mask(env, "box.nii.gz", [(6, 12), (10, 20), (12, 26)])
    r = run(env, "crop", nnunet_id="tiny", series_folders=["ct.nii.gz"], crop_from=path, crop_padding=[2, 3, 1])
    assert r["stages"][0]["crop_ijk"] == [[10, 28], [7, 23], [5, 13]]
    _i, labels = read(r["nifti_prediction"][0])
    region = (slice(5, 13), slice(7, 23), slice(10, 28))  # padding x, y, z = i, j, k
    outside = np.ones(SHAPE, dtype=bool)
    outside[region] = False
    assert not labels[outside].any() and labels[region].any()
    # the same as running the model on the cropped image itself
    crop = env["nii"][10:28, 7:23, 5:13]
    sitk.WriteImage(crop, os.path.join(env["study"], "cropped.nii.gz"))
    alone = run(env, "crop_alone", nnunet_id="tiny", series_folders=["cropped.nii.gz"])
    np.testing.assert_array_equal(labels[region], read(alone["nifti_prediction"][0])[1])


def test_intersect_with_keeps_components_mostly_inside(env):
    path, box = _box_mask(env, "box2.nii.gz", [(4, 16), (8, 28), (10, 34)])
    full = read(run(env, "int_full", nnunet_id="tiny_lesion", series_folders=["ct.nii.gz"])["nifti_prediction"][0])[1]
    r = run(env, "int", nnunet_id="tiny_lesion", series_folders=["ct.nii.gz"], intersect_with=path,
            min_intersection=0.5)
    labels = read(r["nifti_prediction"][0])[1]
    expected, _ = keep_intersecting(full, box, 0.5)
    np.testing.assert_array_equal(labels, expected)
    assert labels.any() and (labels != full).any()


def test_cascade_intersect_and_crop(env):
    first = read(run(env, "c0", nnunet_id="tiny", series_folders=["ct.nii.gz"], class_idx=1,
                     proba_threshold=0.6)["nifti_prediction"][0])[1] > 0
    second = read(run(env, "c1", nnunet_id="tiny_lesion", series_folders=["ct.nii.gz"])["nifti_prediction"][0])[1]
    r = run(env, "cas_int", nnunet_id=["tiny", "tiny_lesion"], series_folders=[["ct.nii.gz"], ["ct.nii.gz"]],
            class_idx=[1, None], proba_threshold=[0.6, None], cascade_mode="intersect", min_intersection=0.3)
    assert [os.path.basename(os.path.dirname(p)) for p in r["nifti_prediction"]] == ["stage_0", "stage_1"]
    assert r["request"]["proba_threshold"] == [0.6, None]
    np.testing.assert_array_equal(read(r["nifti_prediction"][0])[1] > 0, first)
    expected, _ = keep_intersecting(second, first, 0.3)
    np.testing.assert_array_equal(read(r["nifti_prediction"][1])[1], expected)

    # crop: stage 0 runs on crop_from's box, stage 1 on stage 0's mask (which replaces crop_from), both padded
    path, _ = _box_mask(env, "box3.nii.gz", [(3, 9), (20, 30), (8, 14)])
    r = run(env, "cas_crop", nnunet_id=["tiny", "tiny_lesion"], series_folders=["ct.nii.gz"], crop_from=path,
            class_idx=[1, None], proba_threshold=[0.6, None], cascade_mode="crop", crop_padding=2)
    assert r["stages"][0]["crop_ijk"] == [[6, 16], [18, 32], [1, 11]]
    stage0 = read(r["nifti_prediction"][0])[1] > 0
    labels = read(r["nifti_prediction"][1])[1]
    nz = np.nonzero(stage0)
    region = tuple(slice(max(0, a.min() - 2), min(n, a.max() + 3)) for a, n in zip(nz, SHAPE))
    assert r["stages"][1]["crop_ijk"] == [[s.start, s.stop] for s in reversed(region)]
    outside = np.ones(SHAPE, dtype=bool)
    outside[region] = False
    assert outside.sum() > stage0.size / 2 and not labels[outside].any() and labels[region].any()
    assert r["stages"][0]["nnunet_id"] == "tiny_organs" and r["stages"][1]["nnunet_id"] == "tiny_lesion"


# ---------------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("fields,error,match", [
    ({"nnunet_id": "nope", "series_folders": ["ct.nii.gz"]}, UnknownModel, r"unknown model 'nope'.*tiny_organs"),
    ({"nnunet_id": "tiny", "series_folders": ["missing"]}, BadInput, r"series folder 'missing' does not exist"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz", "adc.nii.gz"]}, BadInput,
     r"takes 1 series \(CT\); stage 0 of the request gives 2"),
    ({"nnunet_id": ["tiny", "tiny_lesion"], "series_folders": [["ct.nii.gz"]] * 3}, BadInput, r"same length"),
    ({"nnunet_id": "tiny", "series_folders": ["ct"]}, BadInput, r"is a folder.*is_dicom"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "is_dicom": True, "crop_from": "nothere.nii.gz"},
     BadInput, r"crop_from"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "save_proba_map": True}, BadInput, r"proba_threshold"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "suffix": "../x"}, BadInput, r"suffix"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "class_idx": 7}, BadInput, r"class_idx \[7\]"),
    ({"nnunet_id": "tiny", "series_folders": ["ct.nii.gz"], "study": "x"}, BadInput, r"unknown request field"),
])
def test_bad_requests(env, fields, error, match):
    with pytest.raises(error, match=match):
        run(env, "bad", **fields)


def test_dicom_folder_with_two_series_is_refused(env, tmp_path):
    folder = tmp_path / "mixed"
    write_ct_series(str(folder))
    for p, _u, _i in write_ct_series(str(tmp_path / "other"), phantom(seed=1))[:3]:
        os.rename(p, str(folder / ("B" + os.path.basename(p))))
    with pytest.raises(BadInput, match="holds 2 DICOM series"):
        run_study(env["registry"], env["seg"], {"nnunet_id": "tiny", "study_path": str(tmp_path),
                                                "series_folders": ["mixed"], "is_dicom": True,
                                                "output_dir": str(tmp_path / "o")})


# ---------------------------------------------------------------------------------------------------------- commands

def _cli(*args, fn="main", env=None):
    code = "import sys; from nninteractive_slicer_server.auto.predict_cli import %s; sys.exit(%s())" % (fn, fn)
    return subprocess.run([sys.executable, "-c", code] + list(args), env=env or ENV, capture_output=True, text=True,
                          timeout=120)


def test_nnunet_predict_command(env):
    out = str(env["root"] / "cli")
    p = _cli("-i", env["study"], "-s", "ct", "--nnunet_id", "tiny", "-o", out, "-D", "--class_idx", "1,2",
             "--proba_threshold", "0.3", "-p", "--model-serve-spec", env["spec"], "--device", "cpu")
    assert p.returncode == 0, p.stderr
    response = json.loads(p.stdout)
    assert response["status"] == "done" and response["nifti_prediction_final"] == "prediction.nii.gz"
    for name in ("prediction.nii.gz", "prediction.dcm", "probabilities.nii.gz", "probabilities.dcm"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert "stage 1/1 (tiny_organs): predicting" in p.stderr  # progress
    assert hd.seg.segread(os.path.join(out, "prediction.dcm")).SegmentSequence[0].SegmentLabel == "liver"

    p = _cli("-i", env["study"], "-s", "ct.nii.gz", "--nnunet_id", "nope", "-o", out, "--device", "cpu",
             "--model-serve-spec", env["spec"], "-q")
    assert p.returncode == 2 and "unknown model 'nope'" in p.stderr and "tiny_organs" in p.stderr


def test_nnunet_predict_batch_command(env, tmp_path):
    items = [{"study_path": env["study"], "series_folders": [["ct.nrrd"]], "output_dir": str(tmp_path / "a")},
             {"study_path": env["study"], "series_folders": [["nothere"]], "output_dir": str(tmp_path / "b")}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    args = ["--data_json", str(data), "--nnunet_id", "tiny", "--class_idx", "2", "--device", "cpu"]
    p = _cli(*args, fn="batch_main", env=dict(ENV, MODEL_SERVE_SPEC=""))
    assert p.returncode == 2 and "no model registry" in p.stderr
    p = _cli(*args, fn="batch_main", env=dict(ENV, MODEL_SERVE_SPEC=env["spec"]))  # the spec from the environment
    assert p.returncode == 1, p.stderr  # the second study fails, the first is done
    responses = json.loads(p.stdout)
    assert [r["status"] for r in responses] == ["done", "failed"]
    assert "series folder 'nothere' does not exist" in responses[1]["error"] and "1 of 2 studies done" in p.stderr
    assert "[1/2 " in p.stderr and "[2/2 " in p.stderr
    labels = read(str(tmp_path / "a" / "prediction.nii.gz"))[1]
    assert set(np.unique(labels)) == {0, 2}


def test_batch_data_dir_layout(tmp_path):
    from nninteractive_slicer_server.auto.predict_cli import studies_from_dir

    for name in ("t2_0000.nii.gz", "adc_0001.nii.gz", "notes.txt"):
        (tmp_path / "data" / "p1" / "s1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "p1" / "s1" / name).write_text("")
    items = studies_from_dir(str(tmp_path / "data"), str(tmp_path / "out"))
    assert items == [{"study_path": str(tmp_path / "data" / "p1" / "s1"),
                      "series_folders": [["t2_0000.nii.gz", "adc_0001.nii.gz"]],
                      "output_dir": str(tmp_path / "out" / "p1" / "s1")}]
    (tmp_path / "data" / "p1" / "s1" / "dwi_0003.nii.gz").write_text("")
    with pytest.raises(ValueError, match="without gaps"):
        studies_from_dir(str(tmp_path / "data"), str(tmp_path / "out"))


def test_one_request_definition_for_the_endpoints_the_pipeline_and_the_commands():
    """auto/request.py is the one reading of the /infer body: the pipeline's fields are its fields, the commands'
    requests pass it, and an int ``remove_objects_smaller_than`` (voxels) is not turned into a float (a fraction)."""
    from nninteractive_slicer_server.auto import pipeline
    from nninteractive_slicer_server.auto.predict_cli import make_parser, request_from_args
    from nninteractive_slicer_server.auto.request import FIELDS, InferenceRequest, parse_request

    assert pipeline.REQUEST_FIELDS == FIELDS == tuple(InferenceRequest.model_json_schema()["properties"])
    base = {"nnunet_id": "m", "study_path": "s", "output_dir": "o"}
    assert parse_request(dict(base, remove_objects_smaller_than=5))["remove_objects_smaller_than"] == 5
    assert isinstance(parse_request(dict(base, remove_objects_smaller_than=5))["remove_objects_smaller_than"], int)
    assert parse_request(dict(base, remove_objects_smaller_than=0.5))["remove_objects_smaller_than"] == 0.5
    assert parse_request(dict(base, flip_xy=False, use_folds=0, crop_padding=4)) == dict(
        base, flip_xy=False, use_folds=0, crop_padding=4)
    with pytest.raises(BadInput, match="unknown request field.*nope"):
        parse_request(dict(base, nope=1))
    with pytest.raises(BadInput, match="tta"):
        parse_request(dict(base, tta="yes please"))
    for argv in (["-i", "s", "-s", "ct", "--nnunet_id", "m", "-o", "o"],
                 ["-i", "s", "-s", "t2,adc", "t2", "--nnunet_id", "a", "b", "-o", "o", "-f", "0,1", "all", "-t",
                  "--class_idx", "1,2", "all", "--proba_threshold", "0.5", "None", "--crop_padding", "3",
                  "--min_intersection", "0.2", "--cascade_mode", "crop", "--checkpoint_name", "checkpoint_best.pth",
                  "-D", "-p", "-S", "--suffix", "v1", "--tmp_dir", "t", "--crop_from", "m.nii.gz"]):
        req = request_from_args(make_parser("nnunet-predict", "").parse_args(argv))
        assert parse_request(req) == req
