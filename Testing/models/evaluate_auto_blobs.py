"""Dice of the automatic blob model (auto_blobs/) on held-out phantoms, with nnU-Net's own predictor on the CPU.

For each seed (never a training seed: train_auto_blobs.py draws seeds >= 10000) two phantoms: the default one
(``make_phantom(seed=s)``: 4 bright blobs, ground truth label 1 everywhere) and one with blobs 2 and 4 dark
(``make_phantom(seed=s, dark=(2, 4))``: labels 1 and 2). Prints the Dice of every label present, the Dice of the
foreground (any blob vs predicted nonzero) and the prediction time; and one larger non-cubic phantom predicted
with several sliding windows.

Usage (from the repository root, in the test environment):
    python Testing/models/evaluate_auto_blobs.py [--model Testing/models/auto_blobs] [--seeds 101 102 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import phantoms as P  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "auto_blobs")
DEFAULT_SEEDS = (101, 102, 103, 104, 105, 106)
DARK = (2, 4)


def load_predictor(model: str = DEFAULT_MODEL, threads: int = 2):
    """nnUNetPredictor on the CPU, no mirroring (test-time augmentation), fold 0."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return pred


def ground_truth(ph: P.Phantom) -> np.ndarray:
    """0 background, 1 bright blob, 2 dark blob."""
    gt = np.zeros(ph.labels.shape, dtype=np.uint8)
    for b in ph.blobs:
        gt[ph.labels == b.label] = 1 if b.contrast > 0 else 2
    return gt


def predict(pred, image: np.ndarray) -> np.ndarray:
    """Labels of a [x, y, z] image of spacing 1 (isotropic, so the axis order does not matter to nnU-Net)."""
    return np.asarray(pred.predict_single_npy_array(image[None].astype(np.float32), {"spacing": [1.0, 1.0, 1.0]}))


def scores(seg: np.ndarray, gt: np.ndarray) -> dict:
    out = {"foreground": P.dice(seg > 0, gt > 0)}
    for lab, name in ((1, "bright"), (2, "dark")):
        if (gt == lab).any() or (seg == lab).any():
            out[name] = P.dice(seg == lab, gt == lab)
    return out


def evaluate(model: str = DEFAULT_MODEL, seeds: Sequence[int] = DEFAULT_SEEDS, threads: int = 2) -> dict:
    pred = load_predictor(model, threads)
    rows = []
    cases = [(f"seed {s}", P.make_phantom(seed=s)) for s in seeds]
    cases += [(f"seed {s} dark={list(DARK)}", P.make_phantom(seed=s, dark=DARK)) for s in seeds]
    cases += [("seed 107 shape (80,64,96) 6 blobs dark=[1,4]",
               P.make_phantom((80, 64, 96), n_blobs=6, seed=107, dark=(1, 4)))]
    print(f"{'phantom':44s} {'foreground':>10s} {'bright':>7s} {'dark':>7s} {'time':>6s}")
    for name, ph in cases:
        t = time.time()
        seg = predict(pred, ph.image)
        dt = time.time() - t
        sc = scores(seg, ground_truth(ph))
        rows.append((name, sc, dt))
        print(f"{name:44s} {sc['foreground']:10.3f} {sc.get('bright', float('nan')):7.3f} "
              f"{sc.get('dark', float('nan')):7.3f} {dt:5.2f}s", flush=True)
    for key in ("foreground", "bright", "dark"):
        vals = [sc[key] for _, sc, _ in rows if key in sc]
        print(f"{key}: mean {np.mean(vals):.3f} min {np.min(vals):.3f} over {len(vals)} phantoms")
    return {name: sc for name, sc, _ in rows}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    evaluate(a.model, a.seeds, a.threads)


if __name__ == "__main__":
    main()
