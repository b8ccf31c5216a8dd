"""The committed tiny *trained* automatic model (Testing/models/auto_blobs/, built by train_auto_blobs.py) loaded and
run by nnU-Net's own ``nnUNetPredictor`` on the CPU, on phantoms no training run used (training seeds are >= 10000):
it must find the blobs, and tell bright ones (label 1) from dark ones (label 2). Measured figures are in
Testing/models/README.md; the thresholds here sit well below them.
"""

import json
import os

import numpy as np
import pytest

import phantoms as P
from evaluate_auto_blobs import DEFAULT_MODEL, ground_truth, load_predictor, predict
from train_auto_blobs import LABELS, MIN_TRAIN_SEED

HELD_OUT = (101, 102)
DICE_MIN = 0.9  # measured: 0.97-0.99 (README)


@pytest.fixture(scope="module")
def predictor():
    return load_predictor(DEFAULT_MODEL, threads=2)


def test_result_folder():
    with open(os.path.join(DEFAULT_MODEL, "dataset.json")) as f:
        ds = json.load(f)
    assert ds["labels"] == {"background": 0, "bright_blob": 1, "dark_blob": 2}
    assert tuple(ds["labels"])[1:] == LABELS
    with open(os.path.join(DEFAULT_MODEL, "plans.json")) as f:
        cfg = json.load(f)["configurations"]["3d_fullres"]
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] and cfg["patch_size"] == [64, 64, 64]
    assert os.path.getsize(os.path.join(DEFAULT_MODEL, "fold_0", "checkpoint_final.pth")) < 2_000_000
    assert open(os.path.join(DEFAULT_MODEL, "LICENSE")).read().strip() == "Apache-2.0"
    assert max(HELD_OUT) < MIN_TRAIN_SEED


def test_bright_blobs_found(predictor):
    """Default phantoms (4 bright blobs): label 1 covers them, nothing is called dark, every blob is found."""
    scores = []
    for seed in HELD_OUT:
        ph = P.make_phantom(seed=seed)
        seg = predict(predictor, ph.image)
        assert seg.shape == ph.image.shape and set(np.unique(seg)) <= {0, 1, 2}
        scores.append(P.dice(seg == 1, ph.labels > 0))
        assert (seg == 2).sum() < 0.02 * (ph.labels > 0).sum(), seed
        for b in ph.blobs:  # each blob mostly covered, not only the big ones
            m = P.blob_mask(ph.labels, b.label)
            assert (seg[m] == 1).mean() > 0.7, (seed, b.label)
    assert np.mean(scores) >= DICE_MIN, scores
    assert min(scores) >= DICE_MIN - 0.05, scores


def test_bright_and_dark_blobs(predictor):
    """Blobs 2 and 4 darker than the background: label 2 for them, label 1 for the others."""
    ph = P.make_phantom(seed=103, dark=(2, 4))
    gt = ground_truth(ph)
    assert set(np.unique(gt)) == {0, 1, 2}
    seg = predict(predictor, ph.image)
    bright, dark = P.dice(seg == 1, gt == 1), P.dice(seg == 2, gt == 2)
    assert bright >= DICE_MIN and dark >= DICE_MIN, (bright, dark)
