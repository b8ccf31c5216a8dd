"""Benchmark: what a prompt costs on a CPU with a network of the official model's size, and the fastest exact way.

    python Testing/benchmark/cpu_resenc.py                       # ~1 h on 2 shared cores (a prompt takes minutes)
    python Testing/benchmark/cpu_resenc.py --configs eager:8 eager:4 compile:8 --reps 3   # a larger CPU

The network: ``tiny_models.make_random_resenc_l`` (nnU-Net ResEnc-L, 6 stages, 32-320 features, ~102 M parameters,
patch 192^3: the size of nnInteractive's official model), random weights that predict input-dependent speckle, so
the masks of two configurations can be compared voxel for voxel. The library: ``nnInteractiveInferenceSession`` on
the CPU, autozoom off (every prompt is one forward pass of one 192^3 patch; a real model zooming out on a large
object runs 2-4 passes and refines), undo off. The image and prompts: ``run.py``'s L phantom (256 x 256 x 130,
smooth) and its point / 2D box / scribble / lasso on the middle slice.

A configuration is ``NAME:THREADS``: ``eager`` (the library's default: float32, PyTorch's oneDNN convolutions,
contiguous tensors), ``channels_last`` (weights in ``channels_last_3d``: oneDNN's blocked layouts without reorders),
``compile`` (``torch.compile`` with inductor's ``freezing``: constant weights folded and pre-packed for oneDNN; the
library itself never compiles on a CPU), ``bf16`` (``torch.autocast`` to bfloat16: AMX / AVX512-BF16 where the CPU
has them; never exact, shown for what it would give). ``THREADS``: ``torch.set_num_threads``.

Rounds (``--reps``), configurations in a rotating order (load on a shared machine hits them alike): the first
prompts every kind, the others points. A configuration is exact when its masks equal the reference configuration's
(the first one) voxel for voxel; one that is not leaves the run after that mask. The fastest exact configuration has
the lowest median over all its prompts (every prompt is one forward pass of the same size). Compiled configurations
get one untimed warm-up prompt (the compilation). Prints a Markdown table and writes it with the raw timings to
``--out`` (default Testing/benchmark/out/cpu_resenc.{md,json}). Timings are printed, never asserted.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "Testing", "models"))

from provenance import cpu_name  # noqa: E402
from run import SIZES, _call, _load, phantom, prompts  # noqa: E402  (the L phantom and its prompts)

KINDS = ("point", "bbox", "scribble", "lasso")
NAMES = ("eager", "channels_last", "compile", "bf16")


class _Autocast:
    """The network under bfloat16 autocast, answering float32 as the library expects."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x).float()


def variant(net, name):
    """The network as configuration ``name`` runs it."""
    import copy

    import torch

    if name == "eager":
        return net
    if name == "channels_last":
        return copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
    if name == "compile":
        import torch._inductor.config as inductor

        inductor.freezing = True
        return torch.compile(net)
    if name == "bf16":
        return _Autocast(net)
    raise SystemExit("unknown configuration %r (use %s)" % (name, ", ".join(NAMES)))


class Bench:
    def __init__(self, model_dir, log):
        import torch
        from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

        self.log = log
        with contextlib.redirect_stdout(io.StringIO()):
            self.s = nnInteractiveInferenceSession(device=torch.device("cpu"), use_torch_compile=False, verbose=False,
                                                   torch_n_threads=os.cpu_count(), do_autozoom=False,
                                                   enable_undo=False)
            self.s.initialize_from_trained_model_folder(model_dir, 0, "checkpoint_final.pth")
        self.eager = self.s.network
        self.nets = {}
        shape = SIZES["L"]
        self.prompts = prompts(shape)
        self.buf = np.zeros(shape, np.uint8)
        with contextlib.redirect_stdout(io.StringIO()):
            self.s.set_image(phantom(shape, False)[None])
            self.s.set_target_buffer(self.buf)
            self.s._finish_preprocessing_and_initialize_interactions()

    def prompt(self, config, kind):
        """Seconds of one prompt under ``config`` (``name:threads``), and its mask."""
        import torch

        name, threads = config.split(":")
        if config not in self.nets:
            self.nets[config] = variant(self.eager, name)
        self.s.network = self.nets[config]
        torch.set_num_threads(int(threads))
        with contextlib.redirect_stdout(io.StringIO()):
            self.s.reset_interactions()
            t0 = time.perf_counter()
            _call(self.s, kind, self.prompts[kind], True)
            seconds = time.perf_counter() - t0
        return seconds, self.buf.copy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    n = os.cpu_count() or 1
    p.add_argument("--configs", nargs="+", default=["eager:%d" % n, "eager:1", "channels_last:1", "compile:1",
                                                    "bf16:1"],
                   help="NAME:THREADS, the first is the reference (default: eager:%d eager:1 channels_last:1 "
                        "compile:1 bf16:1)" % n)
    p.add_argument("--reps", type=int, default=2, help="rounds: the first prompts every kind, the others points "
                   "(default 2)")
    p.add_argument("--model-dir", help="a ResEnc-L model folder (default: built in a temporary folder, ~400 MB)")
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    a = p.parse_args(argv)
    for c in a.configs:
        name, _, threads = c.partition(":")
        if name not in NAMES or not threads.isdigit() or int(threads) < 1:
            p.error("configuration %r: give NAME:THREADS with NAME one of %s" % (c, ", ".join(NAMES)))
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import torch

    started = time.time()
    tmp = None
    model = a.model_dir
    if model is None:
        from tiny_models import make_random_resenc_l

        tmp = tempfile.TemporaryDirectory(prefix="nni-resenc-")
        model = make_random_resenc_l(os.path.join(tmp.name, "resenc_l"), background_bias=None)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": "%s, %d CPU cores (%s)" % (
        platform.platform(), n, cpu_name()), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_before": _load(),
        "command": "python Testing/benchmark/cpu_resenc.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    bench = Bench(model, log)
    ref = a.configs[0]
    times = {c: {k: [] for k in KINDS} for c in a.configs}
    masks, warm, repeats = {}, {}, []

    def measure(config, kind, rep):
        if config not in warm and config.startswith("compile"):
            t, _ = bench.prompt(config, "point")
            warm[config] = t
            log("  %s: compiled and warmed up in %.0f s" % (config, t))
        t, m = bench.prompt(config, kind)
        times[config][kind].append(t)
        if (config, kind) in masks:  # a control: the same configuration must give the same mask again
            repeats.append(int(np.count_nonzero(m != masks[config, kind])))
        masks.setdefault((config, kind), m)
        log("  rep %d %-16s %-8s %7.1f s  (load %s)" % (rep, config, kind, t, _load()))

    def differs(config, kind):
        ours, theirs = masks.get((config, kind)), masks.get((ref, kind))
        return None if ours is None or theirs is None else int(np.count_nonzero(ours != theirs))

    # Every kind once, then more points; a configuration leaves once one of its masks differs from the reference's.
    active = list(a.configs)
    for rep in range(a.reps):
        for kind in KINDS if rep == 0 else ("point",):
            shift = rep + KINDS.index(kind)
            for config in active[shift % len(active):] + active[:shift % len(active)]:
                measure(config, kind, rep)
            for config in [c for c in active if differs(c, kind)]:
                log("  %s: %d voxels of the %s mask differ from %s's: not exact, not run again"
                    % (config, differs(config, kind), kind, ref))
                active.remove(config)

    def median_all(config):
        return statistics.median([t for k in KINDS for t in times[config][k]])

    best = min(active, key=median_all)
    meta["load_after"] = _load()
    meta["minutes"] = (time.time() - started) / 60

    lines = ["Produced by `%s`, %s; %s; Python %s, torch %s (CPU capability %s); load average before %s, after %s; "
             "%.0f min." % (meta["command"], meta["date"], meta["machine"], meta["python"], meta["torch"],
                            meta["cpu_capability"], meta["load_before"], meta["load_after"], meta["minutes"]), "",
             "| configuration | " + " | ".join(KINDS) + " | median of all | masks vs %s |" % ref,
             "|---|" + "---|" * (len(KINDS) + 2)]
    for c in a.configs:
        cells = []
        for k in KINDS:
            v = times[c][k]
            cells.append("%.1f s%s" % (statistics.median(v), " (%s)" % ", ".join("%.1f" % x for x in v)
                                       if len(v) > 1 else "") if v else "")
        d = {k: differs(c, k) for k in KINDS if differs(c, k) is not None}
        wrong = ["%s: %d voxels differ" % (k, v) for k, v in d.items() if v]
        verdict = "reference" if c == ref else ("; ".join(wrong) if wrong else "equal")
        if c in warm:
            verdict += "; compile + first prompt %.0f s" % warm[c]
        lines.append("| %s%s | %s | %.1f s | %s |" % (c, " (**fastest exact**)" if c == best else "", " | ".join(cells),
                                                      median_all(c), verdict))
    lines += ["", "Control: %d repeated prompts (same configuration, same kind) gave %s." % (
        len(repeats), "the same mask every time" if not any(repeats) else "masks differing by %s voxels" % repeats)]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cpu_resenc.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "cpu_resenc.json"), "w") as f:
        json.dump({"meta": meta, "times": times, "best": best, "reference": ref, "compile_warmup": warm,
                   "differs": {"%s|%s" % k: differs(*k) for k in masks},
                   "repeats_differ": repeats}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
