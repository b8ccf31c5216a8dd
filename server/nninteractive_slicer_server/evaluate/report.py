"""The summary of ``steps.csv``: mean Dice after each step, AUC of Dice and NSD, time per prompt; and the plot.

AUC as the challenge computes it: the trapezoidal area under an object's curve over the correction steps 1..N at
unit spacing (the first prompt, step 0, is left out: in the challenge it is the box, which not every case has), so
it is at most N - 1; the table gives its mean over objects (the area under the mean curve, the same number).
"""

import os
import statistics
from collections import OrderedDict
from typing import Dict, List, Sequence

from .metrics import auc


def summarize(rows: Sequence[Dict[str, str]], protocols: Sequence[str]) -> List[Dict[str, object]]:
    """One entry per protocol that has rows: ``objects``, ``dice`` / ``nsd`` (mean per step), ``auc_dice``,
    ``auc_nsd``, ``seconds`` (median time of a prompt that ran), ``prompts``."""
    by: Dict[str, Dict[tuple, List[Dict[str, str]]]] = OrderedDict((p, OrderedDict()) for p in protocols)
    for r in rows:
        if r["protocol"] in by:
            by[r["protocol"]].setdefault((r["case"], r["label"]), []).append(r)
    out = []
    for protocol, objects in by.items():
        if not objects:
            continue
        curves = [sorted(v, key=lambda r: int(r["step"])) for v in objects.values()]
        dice = [[float(r["dice"]) for r in c] for c in curves]
        nsd = [[float(r["nsd"]) for r in c] for c in curves]
        ran = [float(r["seconds"]) for c in curves for r in c if r["prompt"] != "none"]
        out.append({
            "protocol": protocol, "objects": len(curves),
            "dice": [statistics.fmean(col) for col in zip(*dice)],
            "nsd": [statistics.fmean(col) for col in zip(*nsd)],
            "auc_dice": statistics.fmean(auc(d[1:]) for d in dice),
            "auc_nsd": statistics.fmean(auc(n[1:]) for n in nsd),
            "seconds": statistics.median(ran) if ran else 0.0, "prompts": len(ran),
        })
    return out


def table(summary: List[Dict[str, object]], tolerance_mm: float) -> str:
    """A Markdown table of ``summarize``'s result."""
    if not summary:
        return "(no objects evaluated)\n"
    steps = max(len(s["dice"]) for s in summary)
    head = (["protocol", "objects"] + ["Dice %d" % i for i in range(steps)]
            + ["NSD %d (%g mm)" % (steps - 1, tolerance_mm), "AUC Dice", "AUC NSD", "s / prompt"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["protocol"], str(s["objects"])] + ["%.3f" % d for d in s["dice"]]
        cells += ["%.3f" % s["nsd"][-1], "%.3f" % s["auc_dice"], "%.3f" % s["auc_nsd"], "%.2f" % s["seconds"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: List[Dict[str, object]], rows: Sequence[Dict[str, str]], path: str):
    """Mean Dice against the step, one line per protocol, with each protocol's interquartile range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        per_step: Dict[int, List[float]] = {}
        for r in rows:
            if r["protocol"] == s["protocol"]:
                per_step.setdefault(int(r["step"]), []).append(float(r["dice"]))
        x = sorted(per_step)
        lo = [np.percentile(per_step[i], 25) for i in x]
        hi = [np.percentile(per_step[i], 75) for i in x]
        line, = ax.plot(x, s["dice"], marker="o", label="%s (%d objects)" % (s["protocol"], s["objects"]))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xticks(range(max(len(s["dice"]) for s in summary)))
    ax.set_xlabel("step (0: first prompt, then one correction each)")
    ax.set_ylabel("Dice (mean; shaded: 25-75 %)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
