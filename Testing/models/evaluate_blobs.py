"""Evaluate the trained blob model with the real nnInteractive library, in-process, on fresh phantoms.

Loads ``Testing/models/blobs`` (or --model) into ``nnInteractiveInferenceSession`` on the CPU and prompts it
on phantoms made with seeds the training never used (training draws its phantom seeds from its own rng;
these are ``make_phantom(seed=s)`` with the default arguments, as tests use them). For each prompt type it
prints the mean / min Dice against the ground truth of the prompted blob(s), with autozoom off and on.

Usage: python Testing/models/evaluate_blobs.py [--model DIR] [--seeds 1000 1001 ...] [--autozoom off on]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import phantoms as P  # noqa: E402
import tiny_models  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "blobs")
DEFAULT_SEEDS = (1000, 1001, 1002, 1003, 1004, 1005)


class Runner:
    """Runs prompts on one phantom and records the library's log (to count autozoom passes)."""

    def __init__(self, session, ph: P.Phantom):
        self.s, self.ph = session, ph
        self.log = io.StringIO()
        with contextlib.redirect_stdout(self.log):
            session.set_image(ph.image[None])
            self.buf = np.zeros(ph.labels.shape, dtype=np.uint8)
            session.set_target_buffer(self.buf)
            session._finish_preprocessing_and_initialize_interactions()

    def reset(self):
        with contextlib.redirect_stdout(self.log):
            self.s.reset_interactions()

    def __call__(self, fn, *args, **kw) -> np.ndarray:
        with contextlib.redirect_stdout(self.log):
            fn(*args, **kw)
        return self.buf.copy()

    def zooms(self) -> int:
        return self.log.getvalue().count("AutoZoom zoom out factor")


def evaluate(model_dir: str = DEFAULT_MODEL, seeds: Sequence[int] = DEFAULT_SEEDS, autozoom: bool = False,
             threads: int = 2) -> Dict[str, List[float]]:
    s = tiny_models.cpu_session(model_dir, autozoom, threads)
    res: Dict[str, List[float]] = defaultdict(list)
    n_predictions = 0
    zooms = 0
    t0 = time.time()
    for seed in seeds:
        ph = P.make_phantom(seed=seed)
        lab = ph.labels
        run = Runner(s, ph)
        rng = np.random.RandomState(seed)
        ids = [b.label for b in ph.blobs]
        for k in ids:
            gt = lab == k
            j = ids[(ids.index(k) + 1) % len(ids)]
            c = P.interior_voxel(lab, k)

            run.reset()
            m = run(s.add_point_interaction, c, include_interaction=True)
            res["point (deepest voxel)"].append(P.dice(m, gt))
            m = run(s.add_point_interaction, c, include_interaction=False)
            res["neg point on it, same voxel: blob left (frac)"].append(float(m[gt].mean()))
            n_predictions += 2

            run.reset()
            m = run(s.add_point_interaction, P.random_interior_voxel(lab, k, rng, min_depth=2), include_interaction=True)
            res["point (random voxel >=2 deep)"].append(P.dice(m, gt))
            m = run(s.add_point_interaction, P.interior_voxel(lab, j), include_interaction=True)
            res["2nd pos point on other blob: Dice of union"].append(P.dice(m, gt | (lab == j)))
            m = run(s.add_point_interaction, P.random_interior_voxel(lab, k, rng, min_depth=2), include_interaction=False)
            res["then neg point on 1st: blob left (frac)"].append(float(m[gt].mean()))
            res["then neg point on 1st: Dice of other"].append(P.dice(m, lab == j))
            n_predictions += 3

            for axis in range(3):
                run.reset()
                m = run(s.add_bbox_interaction, P.box_2d(lab, k, axis), include_interaction=True)
                res["box 2D"].append(P.dice(m, gt))
                run.reset()
                m = run(s.add_scribble_interaction, P.scribble_2d(lab, k, axis), include_interaction=True)
                res["scribble 2D"].append(P.dice(m, gt))
                run.reset()
                m = run(s.add_lasso_interaction, P.lasso_2d(lab, k, axis), include_interaction=True)
                res["lasso 2D"].append(P.dice(m, gt))
                n_predictions += 3

            run.reset()
            init = gt | (lab == j)
            m = run(s.add_initial_seg_interaction, init.astype(np.uint8), run_prediction=False)
            m = run(s.add_point_interaction, P.interior_voxel(lab, k), include_interaction=False)
            res["initial seg of 2 blobs + neg point: blob left (frac)"].append(float(m[gt].mean()))
            res["initial seg of 2 blobs + neg point: Dice of other"].append(P.dice(m, lab == j))
            n_predictions += 1

            run.reset()
            m = run(s.add_initial_seg_interaction, init.astype(np.uint8), run_prediction=True)
            res["initial seg of 2 blobs, refined: Dice"].append(P.dice(m, init))
            n_predictions += 1

        # no prompt at all: the network must predict background (or autozoom would grow needlessly)
        run.reset()
        import torch
        with torch.no_grad(), contextlib.redirect_stdout(run.log):
            x = s._build_network_input([sh // 2 for sh in lab.shape], 1.0)[0]
            fg = int((s.network(x[None])[0].argmax(0) > 0).sum())
        res["no prompt: foreground voxels in the patch"].append(fg)
        zooms += run.zooms()
    res["_predictions"] = [n_predictions]
    res["_autozoom_passes"] = [zooms]
    res["_seconds"] = [time.time() - t0]
    return res


def report(res: Dict[str, List[float]], title: str) -> str:
    lines = [title]
    for k, v in res.items():
        if k.startswith("_"):
            continue
        a = np.asarray(v)
        lines.append(f"  {k:55s} mean {a.mean():.3f}  min {a.min():.3f}  max {a.max():.3f}  n={len(a)}")
    lines.append(f"  {res['_predictions'][0]} predictions, {res['_autozoom_passes'][0]} autozoom passes, "
                 f"{res['_seconds'][0]:.1f}s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--autozoom", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    for az in a.autozoom:
        res = evaluate(a.model, a.seeds, az == "on", a.threads)
        print(report(res, f"autozoom {az} ({a.model}, seeds {a.seeds})"), flush=True)


if __name__ == "__main__":
    main()
