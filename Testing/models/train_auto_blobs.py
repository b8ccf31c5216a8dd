"""Train the tiny automatic (nnU-Net v2) test model on synthetic blobs (deterministic, CPU, 2-6 minutes).

The result folder ``auto_blobs/`` is what nnU-Net writes after training (plans.json, dataset.json,
fold_0/checkpoint_final.pth, plus a LICENSE); ``nnUNetPredictor.initialize_from_trained_model_folder`` loads it and
``predict_single_npy_array`` / ``predict_from_files`` run it. Two labels: 1 ``bright_blob`` (a blob brighter than
the background: every blob of a default ``phantoms.make_phantom``), 2 ``dark_blob`` (a blob darker than the
background: ``make_phantom(..., dark=[...])``).

Every training input goes through nnU-Net's own preprocessing, as the predictor applies it at inference
(``DefaultPreprocessor.run_case_npy`` with the plans written here: transpose, crop to the nonzero region,
ZScore normalization of the whole image, resampling to the plans' spacing); volumes smaller than the patch are
padded with zeros as the predictor's sliding window pads them, larger ones are cropped to random patches.
Phantom seeds are drawn at or above ``MIN_TRAIN_SEED``: tests and evaluate_auto_blobs.py use seeds below it.

Usage (from the repository root, in the test environment; 2 CPU cores):
    python Testing/models/train_auto_blobs.py            # writes Testing/models/auto_blobs/
    python Testing/models/evaluate_auto_blobs.py         # Dice per held-out phantom, with nnUNetPredictor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import phantoms as P  # noqa: E402
import tiny_nnunet as T  # noqa: E402

FEATURES = (8, 16, 32, 64)  # PlainConvUNet, one convolution per stage (tiny_models.architecture)
PATCH = (64, 64, 64)
SPACING = (1.0, 1.0, 1.0)
LABELS = ("bright_blob", "dark_blob")
DATASET_NAME = "Dataset996_AutoBlobs"
DEFAULT_OUT = os.path.join(HERE, "auto_blobs")
MIN_TRAIN_SEED = 10000  # training phantoms never use a seed below this; held-out ones do
STEPS = 300
LR = 3e-3
# shapes of the training volumes: mostly one patch; some smaller (padded) or larger (cropped)
SHAPES = [(64, 64, 64)] * 6 + [(64, 64, 40), (48, 64, 64), (80, 64, 64), (64, 96, 72)]


def configuration_plans() -> dict:
    return dict(T.plans(PATCH, FEATURES, SPACING, 1), dataset_name=DATASET_NAME)


def dataset_json() -> dict:
    return {"channel_names": {"0": "MR"}, "labels": dict({"background": 0}, **{n: i + 1 for i, n in enumerate(LABELS)}),
            "numTraining": 0, "file_ending": ".nii.gz", "name": DATASET_NAME,
            "description": "Synthetic blob phantoms (Testing/models/phantoms.py): bright and dark ellipsoids"}


def write_result_folder(out_dir: str, state: dict) -> str:
    """plans.json, dataset.json, LICENSE and fold_0/checkpoint_final.pth, as nnU-Net writes them."""
    import torch

    os.makedirs(os.path.join(out_dir, "fold_0"), exist_ok=True)
    with open(os.path.join(out_dir, "plans.json"), "w") as f:
        json.dump(configuration_plans(), f, indent=1)
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(dataset_json(), f, indent=1)
    with open(os.path.join(out_dir, "LICENSE"), "w") as f:
        f.write("Apache-2.0\n")
    torch.save({"network_weights": state, "trainer_name": T.TRAINER_NAME,
                "init_args": {"configuration": T.CONFIGURATION},
                "inference_allowed_mirroring_axes": (0, 1, 2)},
               os.path.join(out_dir, "fold_0", "checkpoint_final.pth"))
    return out_dir


class SampleMaker:
    """Random (image, target) patches preprocessed by nnU-Net. ``seed`` drives everything: deterministic."""

    def __init__(self, seed: int):
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.rng = np.random.RandomState(seed)
        self.pm = PlansManager(configuration_plans())
        self.cm = self.pm.get_configuration(T.CONFIGURATION)
        self.dj = dataset_json()
        self.pre = DefaultPreprocessor(verbose=False)

    def phantom(self) -> P.Phantom:
        r = self.rng
        shape = SHAPES[r.randint(len(SHAPES))]
        n = int(r.randint(1, 7))
        sizes = tuple(float(x) for x in r.uniform(3.5, 12.0, size=4))
        p_dark = float(r.choice([0.0, 0.3, 0.6]))
        for _ in range(20):
            dark = [k for k in range(1, n + 1) if r.rand() < p_dark]
            try:
                return P.make_phantom(shape, n_blobs=n, seed=int(r.randint(MIN_TRAIN_SEED, 2**31 - 1)), sizes=sizes,
                                      contrast=(150.0, 700.0), background=(20.0, 300.0),
                                      noise=float(r.choice([0.0, r.uniform(0, 25)])), gap=float(r.uniform(3, 6)),
                                      dark=dark)
            except ValueError:
                n = max(1, n - 1)
        raise RuntimeError("no phantom")

    def sample(self) -> Tuple[np.ndarray, np.ndarray]:
        """One (image float32 [1, *PATCH], target int64 [*PATCH]: 0 background, 1 bright, 2 dark blob)."""
        r = self.rng
        ph = self.phantom()
        target = np.zeros(ph.labels.shape, dtype=np.int16)
        for b in ph.blobs:
            target[ph.labels == b.label] = 1 if b.contrast > 0 else 2
        data, seg, _ = self.pre.run_case_npy(ph.image[None].astype(np.float32), target[None],
                                             {"spacing": list(SPACING)}, self.pm, self.cm, self.dj)
        data, seg = data[0], np.maximum(seg[0], 0)  # -1: outside the nonzero mask (background)
        # pad as the sliding window pads (zeros, split evenly), or crop a random patch
        pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for p, s in zip(PATCH, data.shape)]
        data, seg = np.pad(data, pads), np.pad(seg, pads)
        lo = [int(r.randint(s - p + 1)) for p, s in zip(PATCH, data.shape)]
        box = tuple(slice(l, l + p) for l, p in zip(lo, PATCH))
        return np.ascontiguousarray(data[box][None], dtype=np.float32), seg[box].astype(np.int64)


def augment(rng: np.random.RandomState, x: np.ndarray, y: np.ndarray):
    """A random axis permutation and flips (the phantoms have no preferred orientation)."""
    perm = [int(i) for i in rng.permutation(3)]
    x, y = x.transpose(0, *[p + 1 for p in perm]), y.transpose(*perm)
    for a in range(3):
        if rng.rand() < 0.5:
            x, y = np.flip(x, a + 1), np.flip(y, a)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def dice_loss(logits, target, n_classes: int):
    """Soft Dice of the foreground classes over the whole batch (nnU-Net's batch Dice), averaged."""
    import torch

    p = torch.softmax(logits, 1)[:, 1:]
    t = torch.nn.functional.one_hot(target, n_classes).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (p * t).sum(dims)
    return (1 - (2 * inter + 1.0) / (p.sum(dims) + t.sum(dims) + 1.0)).mean()


def train(out_dir: str = DEFAULT_OUT, steps: int = STEPS, lr: float = LR, batch: int = 2, seed: int = 0,
          threads: int = 2, log_every: int = 50) -> str:
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    t0 = time.time()
    n_classes = len(LABELS) + 1
    net = T.build_network(FEATURES, 1, n_classes)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"network PlainConvUNet {FEATURES}, patch {PATCH}: {n_params} parameters ({n_params * 4 / 1e6:.2f} MB fp32); "
          f"{steps} steps of {batch}, lr {lr:g}", flush=True)
    maker = SampleMaker(seed + 1)
    aug_rng = np.random.RandomState(seed + 2)
    net = net.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    run, t_data = [], 0.0
    for step in range(1, steps + 1):
        td = time.time()
        xs, ys = zip(*(augment(aug_rng, *maker.sample()) for _ in range(batch)))
        x = torch.from_numpy(np.stack(xs)).to(memory_format=torch.channels_last_3d)
        y = torch.from_numpy(np.stack(ys))
        t_data += time.time() - td
        # bfloat16 autocast: faster on CPUs with AVX512-BF16 (the model is used in fp32 afterwards)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, y) + dice_loss(logits, y, n_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        sched.step()
        run.append(loss.item())
        if step % log_every == 0 or step == steps:
            el = time.time() - t0
            print(f"step {step}/{steps} loss {np.mean(run[-log_every:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el:.0f}s (data {t_data:.0f}s) eta {el / step * (steps - step):.0f}s", flush=True)
    net.eval()
    # contiguous again, and the state dict as it is: the decoder holds the encoder, so its weights appear under two
    # keys sharing one storage, which torch.save writes once (a copy per key would double the checkpoint)
    net = net.to(memory_format=torch.contiguous_format)
    state = net.state_dict()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    write_result_folder(out_dir, state)
    size = os.path.getsize(os.path.join(out_dir, "fold_0", "checkpoint_final.pth"))
    print(f"trained in {time.time() - t0:.0f}s; wrote {out_dir} (checkpoint {size / 1e6:.2f} MB)", flush=True)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    a = p.parse_args(argv)
    train(a.out, a.steps, a.lr, a.batch, a.seed, a.threads)


if __name__ == "__main__":
    main()
