"""nnU-Net's prediction cut into pieces (``auto/pieces.py``) against nnU-Net's own one-call functions, in this process,
on tiny random nnU-Net models (Testing/models/tiny_nnunet.py) and a real ``DeviceQueue``:

* the logits equal ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (two folds, mirroring, an image smaller
  than the patch, resampling with and without a separate z axis);
* the labels equal ``convert_predicted_logits_to_segmentation_with_correct_shape`` (with probabilities too, which
  agree to float32 rounding), for class subsets and for a region-based model;
* the export holds one class at full resolution at a time: its peak of numpy allocations does not grow with the
  number of classes, while nnU-Net's does (tracemalloc counts every numpy allocation; no clock involved).
"""

import json
import os
import tracemalloc

import numpy as np
import pytest
import torch

import tiny_nnunet
from nninteractive_slicer_server.auto.pieces import export_steps, logits_steps
from nninteractive_slicer_server.auto.predictors import LoadedPredictor
from nninteractive_slicer_server.scheduler import DeviceQueue

PATCH = (32, 32, 32)
CASES = {  # image shape [c, k, j, i], spacing: what nnU-Net's preprocessing and export then do
    "resampled": ((1, 20, 50, 40), (2.0, 0.8, 0.8)),
    "separate_z": ((1, 10, 40, 44), (4.0, 1.0, 1.0)),  # anisotropic: in-plane resampling, then z alone
    "padded": ((1, 24, 20, 40), (1.0, 1.0, 1.0)),  # smaller than the patch on one axis
}


def reference(folder, folds):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                        device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(folder, use_folds=folds)
    return p


def nnunet_export(p, logits, props, probabilities=False, label_manager=None):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, p.plans_manager, p.configuration_manager, label_manager or p.label_manager, props,
        return_probabilities=probabilities, num_threads_torch=torch.get_num_threads())


def image(case, seed=0):
    shape, spacing = CASES[case]
    img = np.random.RandomState(seed).rand(*shape).astype(np.float32) * 100
    img[:, :, :2] = 0  # a zero border: nnU-Net crops to the nonzero box, the export puts it back
    return img, spacing


@pytest.fixture(scope="module")
def queue():
    q = DeviceQueue(name="test-pieces")
    yield q
    q.shutdown()


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    """Two folds, three labels; ours and nnU-Net's reference predictor (separate networks)."""
    torch.set_num_threads(2)
    folder = tiny_nnunet.make_tiny_nnunet(str(tmp_path_factory.mktemp("pieces")), labels=["a", "b", "c"],
                                          folds=(0, 1), patch_size=PATCH)
    return LoadedPredictor(folder, (0, 1), "checkpoint_final.pth", "cpu"), reference(folder, (0, 1))


@pytest.mark.parametrize("case,tta", [("resampled", False), ("separate_z", False), ("padded", False),
                                      ("padded", True)])
def test_logits_equal_nnunets(organs, queue, case, tta):
    ours, theirs = organs
    data, props = ours.preprocess(*image(case))
    steps, pieces = ours.steps(data, props, tta)
    (labels, _), run = queue.run_pieces(steps, expected=pieces)
    assert run.done + 1 == pieces  # the last piece returns (the positions count it too)
    logits, _ = queue.run_pieces(lambda r: logits_steps(ours, data, r, tta))
    theirs.use_mirroring = tta
    expected = theirs.predict_logits_from_preprocessed_data(data)
    assert logits.dtype == expected.dtype == torch.float16
    assert torch.equal(logits, expected)
    np.testing.assert_array_equal(labels, nnunet_export(theirs, expected, props))


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_equals_nnunets(organs, queue, case):
    ours, theirs = organs
    data, props = ours.preprocess(*image(case, seed=1))
    theirs.use_mirroring = False
    logits = theirs.predict_logits_from_preprocessed_data(data)
    labels, _ = queue.run_pieces(lambda r: export_steps(ours.predictor, logits, props, r))
    expected = nnunet_export(theirs, logits, props)
    assert labels.dtype == expected.dtype and labels.shape == expected.shape == CASES[case][0][1:]
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(labels)) > 1

    (labels, probs), _ = queue.run_pieces(lambda r: export_steps(ours.predictor, logits, props, r,
                                                                 probabilities=True))
    expected_labels, expected_probs = nnunet_export(theirs, logits, props, probabilities=True)
    np.testing.assert_array_equal(labels, expected_labels)
    assert probs.dtype == expected_probs.dtype and probs.shape == expected_probs.shape
    np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=1e-6)  # slab-wise softmax: float32 rounding


def test_class_subsets_equal_nnunets_export_of_the_subset(organs, queue):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    ours, theirs = organs
    data, props = ours.preprocess(*image("resampled", seed=2))
    theirs.use_mirroring = False
    logits = theirs.predict_logits_from_preprocessed_data(data)
    for subset in ([2], [1, 3]):
        keep = [0] + subset
        lm = LabelManager({"background": 0, **{"c%d" % v: i + 1 for i, v in enumerate(subset)}},
                          regions_class_order=None)
        expected, expected_probs = nnunet_export(theirs, logits[keep], props, True, lm)
        steps, _ = ours.steps(data, props, class_idx=subset, probabilities=True)
        (labels, probs), _ = queue.run_pieces(steps)
        np.testing.assert_array_equal(labels, np.array(keep)[expected])  # the classes' own values
        np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=1e-6)


def test_a_region_model_exports_as_nnunet(tmp_path, queue):
    folder = tiny_nnunet.make_tiny_nnunet(str(tmp_path), labels=["tumour"], patch_size=PATCH, seed=3)
    path = os.path.join(folder, "dataset.json")
    with open(path) as f:
        ds = json.load(f)
    ds["labels"] = {"background": 0, "whole": [1, 2], "core": 2}  # two regions: two network outputs
    ds["regions_class_order"] = [1, 2]
    with open(path, "w") as f:
        json.dump(ds, f)
    ours, theirs = LoadedPredictor(folder, (0,), "checkpoint_final.pth", "cpu"), reference(folder, (0,))
    assert ours.has_regions and ours.label_values == [1, 2]
    data, props = ours.preprocess(*image("separate_z", seed=4))
    logits = theirs.predict_logits_from_preprocessed_data(data)
    labels, _ = queue.run_pieces(lambda r: export_steps(ours.predictor, logits, props, r))
    np.testing.assert_array_equal(labels, nnunet_export(theirs, logits, props))
    (labels, probs), _ = queue.run_pieces(lambda r: export_steps(ours.predictor, logits, props, r,
                                                                 probabilities=True))
    expected_labels, expected_probs = nnunet_export(theirs, logits, props, probabilities=True)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=1e-6)


def peak_numpy_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_export_holds_one_class_at_full_resolution(tmp_path, queue):
    """With 40 classes nnU-Net's export converts all of them to float64 at once; ours holds about as much as with
    4 classes (one class at a time), whatever the number of classes."""
    img, spacing = image("resampled", seed=5)
    peaks = {}
    for n in (3, 39):
        folder = tiny_nnunet.make_tiny_nnunet(str(tmp_path / str(n)), labels=["l%d" % i for i in range(n)],
                                              patch_size=PATCH)
        ours, theirs = LoadedPredictor(folder, (0,), "checkpoint_final.pth", "cpu"), reference(folder, (0,))
        data, props = ours.preprocess(img, spacing)
        logits = theirs.predict_logits_from_preprocessed_data(data)
        mine = peak_numpy_bytes(lambda: queue.run_pieces(lambda r: export_steps(ours.predictor, logits, props, r)))
        nnunet = peak_numpy_bytes(lambda: nnunet_export(theirs, logits, props))
        peaks[n + 1] = (mine, nnunet)
    network_voxels = int(np.prod(logits.shape[1:]))
    (ours4, nnunet4), (ours40, nnunet40) = peaks[4], peaks[40]
    assert ours40 <= ours4 * 1.1, peaks  # does not grow with the classes
    assert nnunet40 >= 40 * network_voxels * 8, peaks  # every class in float64 at once
    assert ours40 * 5 < nnunet40, peaks
