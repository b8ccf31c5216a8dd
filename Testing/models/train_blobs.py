"""Train the tiny nnInteractive test model on synthetic blobs (deterministic, CPU, about 25 minutes).

The network learns to segment the blob under a positive prompt (point, 2D box, 2D scribble, 2D lasso),
to keep what the previous segmentation (prev_seg channel) holds, and to drop a blob from it on a
negative click. Every training input is built by the real library: an ``nnInteractiveInferenceSession``
gets the phantom image and the prompts (``run_prediction=False``), then its own ``_build_network_input``
makes the network input exactly as at inference (z-scored image, then the 7 interaction channels
prev_seg, bbox/lasso +/-, points +/-, scribble +/-, cropped/padded around the last prompt, decay
normalized, resampled when zoomed out). Targets are the phantom's ground truth cropped the same way.
Two phases (``PHASES``): the full task mix, then one weighted towards negative clicks.

Usage (from the repository root, in the test environment; 2 CPU cores: ~15 + ~10 minutes):
    python Testing/models/train_blobs.py                 # writes Testing/models/blobs/
    python Testing/models/evaluate_blobs.py              # Dice per prompt type with the real library
    python Testing/models/train_blobs.py --steps 3000 0 --out /tmp/phase1          # phase 1 only, then resume:
    python Testing/models/train_blobs.py --start-from /tmp/phase1 --first-phase 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence, Set, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import phantoms as P  # noqa: E402
import tiny_models  # noqa: E402

FEATURES = (4, 8, 16, 32, 64)
N_CONV = 1
PATCH = (64, 64, 64)
DEFAULT_OUT = os.path.join(HERE, "blobs")
POOL = 32  # recent samples kept for replay

# shapes of the training volumes: mostly one patch; some smaller (padded by the library) or larger
SHAPES = [(64, 64, 64)] * 8 + [(64, 64, 32), (64, 48, 64), (80, 64, 64), (64, 96, 72)]
TASKS = {  # task: weight (normalized to probabilities)
    "point": 0.2, "box": 0.11, "scribble": 0.09, "lasso": 0.09,
    "neg_point": 0.32, "neg_other": 0.05, "prev_only": 0.09, "empty": 0.05,
}
# Removing a blob with a negative click is learnt last: after the first phase a positive click already gives
# Dice ~0.94, but a negative one leaves ~60% of the blob; a second phase with half of the samples negative
# clicks (at a lower rate) teaches it without losing the rest.
NEGATIVE_HEAVY = dict(TASKS, neg_point=0.6)
PHASES = [(3000, 3e-3, TASKS), (2000, 1e-3, NEGATIVE_HEAVY)]  # (steps, max learning rate, task weights)


@contextlib.contextmanager
def quiet():
    """The library prints a line or more per call; keep the training log readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _good_slice(rng: np.random.RandomState, labels: np.ndarray, k: int, axis: int) -> int:
    """A slice along axis whose cross-section of blob k is at least 40% of its largest."""
    other = tuple(a for a in range(3) if a != axis)
    areas = (labels == k).sum(axis=other)
    cand = np.flatnonzero(areas >= 0.4 * areas.max())
    return int(cand[rng.randint(len(cand))])


class SampleMaker:
    """Random (input, target) pairs encoded by the library. ``rng`` drives everything: deterministic."""

    def __init__(self, session, seed: int, tasks: Optional[dict] = None):
        self.s = session
        self.rng = np.random.RandomState(seed)
        self.tasks = dict(tasks or TASKS)

    def phantom(self) -> P.Phantom:
        r = self.rng
        shape = SHAPES[r.randint(len(SHAPES))]
        n = int(r.randint(2, 7))
        sizes = tuple(float(x) for x in r.uniform(4.0, 12.0, size=4))
        for _ in range(20):
            try:
                return P.make_phantom(shape, n_blobs=n, seed=int(r.randint(2**31 - 1)), sizes=sizes,
                                      contrast=(150.0, 700.0), background=(20.0, 300.0),
                                      noise=float(r.choice([0.0, r.uniform(0, 25)])), gap=float(r.uniform(3, 6)))
            except ValueError:
                n = max(1, n - 1)
        raise RuntimeError("no phantom")

    # -- prompts through the library ------------------------------------------------------------------
    def _prompt(self, kind: str, labels: np.ndarray, k: int, positive: bool, at: Optional[Tuple[int, int, int]] = None):
        r, s = self.rng, self.s
        if kind == "point":
            p = at if at is not None else P.random_interior_voxel(labels, k, r, min_depth=float(r.uniform(0, 3)))
            s.add_point_interaction(p, include_interaction=positive, run_prediction=False)
            return p
        axis = int(r.randint(3))
        idx = _good_slice(r, labels, k, axis)
        if kind == "box":
            s.add_bbox_interaction(P.box_2d(labels, k, axis, idx, margin=3, rng=r), include_interaction=positive,
                                   run_prediction=False)
        elif kind == "scribble":
            s.add_scribble_interaction(P.scribble_2d(labels, k, axis, idx, thickness=2, rng=r),
                                       include_interaction=positive, run_prediction=False)
        elif kind == "lasso":
            s.add_lasso_interaction(P.lasso_2d(labels, k, axis, idx, margin=3, rng=r), include_interaction=positive,
                                    run_prediction=False)
        else:
            raise ValueError(kind)
        return None

    def _perturb(self, m: np.ndarray) -> np.ndarray:
        """A previous segmentation is a prediction, not the ground truth: shift its border a little."""
        from scipy import ndimage

        u = self.rng.rand()
        if u < 0.15:
            m = ndimage.binary_dilation(m)
        elif u < 0.3:
            m = ndimage.binary_erosion(m)
        return m

    def sample(self, task: Optional[str] = None):
        """One (input float32 [8, *PATCH], target int64 [*PATCH], task name)."""
        import torch
        from nnInteractive.utils.crop import crop_to_valid, pad_cropped

        r, s = self.rng, self.s
        if task is None:
            names = list(self.tasks)
            weights = np.array([self.tasks[n] for n in names])
            task = names[r.choice(len(names), p=weights / weights.sum())]
        ph = self.phantom()
        labels = ph.labels
        ids = [b.label for b in ph.blobs]
        k = ids[r.randint(len(ids))]
        others = [i for i in ids if i != k]

        # previous segmentation S (blobs already segmented) and the target
        prev: Set[int] = set()
        if task in ("point", "box", "scribble", "lasso"):
            if r.rand() < 0.4:
                prev = set(i for i in others if r.rand() < 0.5)
            target = prev | {k}
        elif task == "neg_point":
            prev = {k} | set(i for i in others if r.rand() < 0.6)
            target = prev - {k}
        elif task == "neg_other":  # negative click on background or on a blob that is not segmented
            prev = set(i for i in others if r.rand() < 0.6)
            target = set(prev)
        elif task == "prev_only":
            prev = set(i for i in ids if r.rand() < 0.5) or {k}
            target = set(prev)
        else:  # empty: nothing at all predicts nothing
            target = set()

        with quiet():
            s.set_image(ph.image[None])
            s.set_target_buffer(np.zeros(labels.shape, dtype=np.uint8))
            s._finish_preprocessing_and_initialize_interactions()
            if prev:
                s.add_initial_seg_interaction(self._perturb(np.isin(labels, sorted(prev))).astype(np.uint8),
                                              run_prediction=False)
            # older prompts that produced the previous segmentation
            hist = [i for i in sorted(prev) if r.rand() < 0.5]
            kinds = ["point", "point", "box", "scribble", "lasso"]
            last_pos_k = None
            for i in hist:
                kind = kinds[r.randint(len(kinds))]
                p = self._prompt(kind, labels, i, True)
                if i == k and kind == "point":
                    last_pos_k = p
            if task in ("point", "box", "scribble", "lasso"):
                self._prompt(task, labels, k, True)
            elif task == "neg_point":
                # often right after (or exactly where) a positive click on the same blob: negative wins
                u = r.rand()
                if last_pos_k is None and u < 0.6:
                    last_pos_k = self._prompt("point", labels, k, True)
                at = last_pos_k if (last_pos_k is not None and u < 0.5) else None
                self._prompt("point", labels, k, False, at=at)
            elif task == "neg_other":
                if r.rand() < 0.5 and len(set(ids) - prev) > 0:
                    j = sorted(set(ids) - prev)[r.randint(len(set(ids) - prev))]
                    self._prompt("point", labels, j, False)
                else:
                    bg = np.argwhere(labels == 0)
                    s.add_point_interaction(tuple(int(v) for v in bg[r.randint(len(bg))]), include_interaction=False,
                                            run_prediction=False)
            elif task == "prev_only" and prev:
                s._generic_add_patch_from_image(s.interactions[s._get_prev_seg_channel()].float())

            if s.new_interaction_centers:
                center = list(s.new_interaction_centers[-1])
                zoom = float(s.new_interaction_zoom_out_factors[-1])
            else:
                center = [int(r.randint(sh)) for sh in labels.shape]
                zoom = 1.0
            s.new_interaction_centers.clear()
            s.new_interaction_zoom_out_factors.clear()
            # refinement patches and autozoom look at the prompt off-centre / zoomed out
            if r.rand() < 0.25:
                center = [int(c + r.randint(-20, 21)) for c in center]
            if r.rand() < 0.06:
                zoom = min(4.0, zoom * float(r.choice([1.5, 2.25])))
            with torch.no_grad():
                x, scaled_patch, scaled_bbox, _ = s._build_network_input(center, zoom)
                x = x.float().clone()

        y = torch.from_numpy(np.isin(labels, sorted(target)).astype(np.float32))[None]
        yc, pad = crop_to_valid(y, scaled_bbox)
        yc = pad_cropped(yc, pad)
        if list(yc.shape[1:]) != list(PATCH):
            yc = torch.nn.functional.interpolate(yc[None], size=PATCH, mode="area")[0]
        return x, (yc[0] >= 0.5).long(), task


def dice_loss(logits, target):
    """Soft Dice of the foreground over the whole batch (nnU-Net's batch Dice). Pooled over the batch, a
    sample whose target is empty (a negative click removed the only blob) still gets a strong gradient
    against its false positives; a per-sample Dice would give it none exactly when it is worst."""
    import torch

    p = torch.softmax(logits, 1)[:, 1]
    t = target.float()
    inter = (p * t).sum()
    return 1 - (2 * inter + 1.0) / (p.sum() + t.sum() + 1.0)


CHANGED_WEIGHT = 4.0  # extra cross-entropy weight of the voxels the prompt changes


def changed_voxel_weights(x, target):
    """Per-voxel cross-entropy weights: 1, plus CHANGED_WEIGHT where the target differs from the previous
    segmentation (input channel 1). Without it the network mostly learns to copy prev_seg: the voxels a
    negative click must remove are under 1% of a patch, and their loss drowns in the ones it keeps."""
    prev = x[:, 1] > 0.5
    return 1.0 + CHANGED_WEIGHT * (prev != target.bool()).float()


def augment(rng: np.random.RandomState, x, y):
    """A random axis permutation and flips of an encoded sample: the library's encoding treats the three
    axes alike (isotropic point balls, boxes, padding), so this is another valid input/target pair."""
    perm = [int(i) for i in rng.permutation(3)]
    flips = [a + 1 for a in range(3) if rng.rand() < 0.5]
    x = x.permute(0, *[p + 1 for p in perm])
    y = y.permute(*perm)
    if flips:
        x = x.flip(flips)
        y = y.flip([f - 1 for f in flips])
    return x.contiguous(), y.contiguous()


def train_phase(net, maker: "SampleMaker", steps: int, lr: float, batch: int, seed: int,
                log_every: int = 50) -> None:
    """One phase: a fresh AdamW with a one-cycle learning rate, samples from ``maker``."""
    import torch

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=max(0.05, 3.0 / steps))
    t0 = time.time()
    t_data = 0.0
    run = []
    pool: List = []
    aug_rng = np.random.RandomState(seed + 2)
    net.train()
    for step in range(1, steps + 1):
        td = time.time()
        # half of each batch is fresh, half replays a recent sample (each is seen about twice, in a
        # different orientation): the library encoding costs about as much as a training step
        xs, ys = [], []
        for i in range(batch):
            if i % 2 == 0 or len(pool) == 0:
                x, y, _ = maker.sample()
                pool.append((x, y))
                del pool[:-POOL]
            else:
                x, y = pool[aug_rng.randint(len(pool))]
            x, y = augment(aug_rng, x, y)
            xs.append(x)
            ys.append(y)
        # channels_last_3d: the same math, ~2x faster convolutions on the CPU
        x, y = torch.stack(xs).to(memory_format=torch.channels_last_3d), torch.stack(ys)
        t_data += time.time() - td
        # bfloat16 autocast: ~1.6x faster on CPUs with AVX512-BF16 (the model is used in fp32 afterwards)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(x)
        logits = logits.float()
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        w = changed_voxel_weights(x, y)
        loss = (ce * w).sum() / w.sum() + dice_loss(logits, y)
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


def train(out_dir: str = DEFAULT_OUT, phases: Sequence[Tuple[int, float, dict]] = PHASES, batch: int = 2,
          seed: int = 0, threads: int = 2, start_from: Optional[str] = None, first_phase: int = 1) -> str:
    """Train every phase in turn (each re-seeded alike, so a run resumed with ``start_from`` = the model written
    after phase N and ``first_phase`` = N + 1 gives the same weights as an uninterrupted one)."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    state = None
    if start_from:
        ckpt = torch.load(os.path.join(start_from, "fold_0", "checkpoint_final.pth"), weights_only=False)
        state = ckpt["network_weights"]
    for number, (steps, lr, tasks) in enumerate(phases, start=1):
        if number < first_phase or steps == 0:
            continue
        torch.manual_seed(seed)
        net = tiny_models.build_network(PATCH, FEATURES, N_CONV)
        if state is not None:
            net.load_state_dict(state)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"phase {number}: {steps} steps, lr {lr:g}, tasks {tasks}; network {FEATURES} n_conv={N_CONV}: "
              f"{n_params} parameters ({n_params * 4 / 1e6:.2f} MB fp32)", flush=True)
        # the library encodes the samples; it needs a model folder, whose weights play no part in the encoding
        tmp = tempfile.mkdtemp(prefix="blobs_enc_")
        tiny_models.write_model_folder(tmp, net.state_dict(), PATCH, FEATURES, N_CONV)
        maker = SampleMaker(tiny_models.cpu_session(tmp), seed=seed + 1, tasks=tasks)
        net = net.to(memory_format=torch.channels_last_3d)
        train_phase(net, maker, steps, lr, batch, seed)
        state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    tiny_models.write_model_folder(out_dir, state, PATCH, FEATURES, N_CONV)
    print(f"trained in {time.time() - t0:.0f}s; wrote {out_dir}", flush=True)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, nargs=len(PHASES), default=[n for n, _, _ in PHASES],
                   help="steps of each phase")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--start-from", help="a model folder written after phase FIRST_PHASE - 1 (resume)")
    p.add_argument("--first-phase", type=int, default=1)
    a = p.parse_args(argv)
    phases = [(n, lr, tasks) for n, (_, lr, tasks) in zip(a.steps, PHASES)]
    train(a.out, phases, a.batch, a.seed, a.threads, a.start_from, a.first_phase)


if __name__ == "__main__":
    main()
