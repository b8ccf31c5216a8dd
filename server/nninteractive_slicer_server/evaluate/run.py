"""Running the simulated user: one session (a server's, or the library in this process), every case, object and
protocol, each step's Dice, NSD and time written to ``steps.csv`` as soon as an object's run is complete.

A session is anything with nnInteractive's session API (``RemoteSession`` of our client, which speaks to our server
and to the official one alike, or ``nnInteractiveInferenceSession``): ``set_image``, ``set_target_buffer``,
``reset_interactions``, ``add_bbox_interaction``, ``add_point_interaction``, ``add_scribble_interaction``,
``supported_interactions``, ``preferred_scribble_thickness``. Each object starts from ``reset_interactions`` (an
empty mask, no prompts) and its prompts accumulate in that session, as a user's would.

Resuming: ``steps.csv`` holds whole objects only (a run's rows are appended together once it is done); rows of an
object cut short (a crash while writing) are dropped when the file is opened again, and that object runs again.
"""

import contextlib
import csv
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import dataset as D
from .metrics import dice, nsd
from .simulate import box_prompt, click_prompt, scribble_prompt

PROTOCOLS = {
    "cvpr25": "the challenge's: a box (z range and middle slice), then clicks at the largest error",
    "points": "a click at the object's deepest voxel, then clicks at the largest error",
    "scribbles": "a scribble through that voxel on its slice, then scribbles through the largest error",
}
COLUMNS = ["case", "label", "protocol", "step", "prompt", "where", "dice", "nsd", "seconds"]
SETTINGS_FILE = "run.json"
STEPS_FILE = "steps.csv"


class EvaluationError(RuntimeError):
    """The run cannot go on (bad output folder, a model that cannot take the prompts asked for)."""


@dataclass(frozen=True)
class Settings:
    """What the figures depend on: a run resumed with other settings would mix incomparable rows."""

    clicks: int = 5  # corrections after the first prompt
    tolerance_mm: float = 2.0  # NSD tolerance (the challenge's)
    box: str = "auto"  # "auto": a 3D box when the model takes one (as nnInteractive's challenge baseline), else 2D

    @property
    def steps(self) -> int:
        return self.clicks + 1


# ---------------------------------------------------------------------------------------------------- steps.csv

class StepsFile:
    """``OUT/steps.csv``: the rows of complete objects; ``done(case, label, protocol)`` says which ran already."""

    def __init__(self, path: str, steps: int):
        self.path, self.steps = path, steps
        self.rows: List[Dict[str, str]] = []
        self._done: Set[Tuple[str, int, str]] = set()
        if os.path.exists(path):
            self._load()
        else:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def _load(self):
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != COLUMNS:
                raise EvaluationError("%s was not written by this tool (its first line is %s); give another --out"
                                      % (self.path, header))
            groups: Dict[Tuple[str, int, str], List[Dict[str, str]]] = {}
            dropped = 0
            for fields in reader:
                row = dict(zip(COLUMNS, fields)) if len(fields) == len(COLUMNS) else None
                key = _row_key(row) if row else None
                if key is None:
                    dropped += 1
                    continue
                groups.setdefault(key, []).append(row)
        for key, rows in groups.items():
            if sorted(int(r["step"]) for r in rows) == list(range(self.steps)):
                self._done.add(key)
                self.rows.extend(sorted(rows, key=lambda r: int(r["step"])))
            else:
                dropped += len(rows)
        if dropped:  # rewrite without the remains of an interrupted write
            tmp = self.path + ".tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, COLUMNS)
                w.writeheader()
                w.writerows(self.rows)
            os.replace(tmp, self.path)

    def done(self, case: str, label: int, protocol: str) -> bool:
        return (case, int(label), protocol) in self._done

    def add(self, rows: List[Dict[str, object]]):
        """Append one object's rows in one write."""
        buf = io.StringIO()
        csv.DictWriter(buf, COLUMNS).writerows(rows)
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        text = [{k: str(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(buf.getvalue()), COLUMNS)]
        self.rows.extend(text)
        self._done.add(_row_key(text[0]))


def _row_key(row: Dict[str, str]) -> Optional[Tuple[str, int, str]]:
    """``(case, label, protocol)`` of a well-formed row, None for anything else (a torn line)."""
    try:
        int(row["step"])
        float(row["dice"]), float(row["nsd"]), float(row["seconds"])
        if row["protocol"] not in PROTOCOLS or not row["case"]:
            return None
        return row["case"], int(row["label"]), row["protocol"]
    except (KeyError, TypeError, ValueError):
        return None


def open_output(out: str, settings: Settings, target: str) -> StepsFile:
    """The output folder (made when missing), its settings checked against those of an earlier run there."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, SETTINGS_FILE)
    mine = asdict(settings)
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EvaluationError("%s cannot be read (%s); give another --out" % (path, exc))
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            said = ", ".join("%s %s, not %s" % (k, a, b) for k, (a, b) in sorted(differ.items()))
            raise EvaluationError("%s holds a run with other settings (%s); resume with those, or give another --out"
                                  % (out, said))
    else:
        with open(path, "w") as f:
            json.dump({"settings": mine, "target": target}, f, indent=1)
    return StepsFile(os.path.join(out, STEPS_FILE), settings.steps)


# ---------------------------------------------------------------------------------------------------- sessions

class _Quiet:
    """nnInteractive's in-process session prints as it works; keep the progress line readable."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        value = getattr(self._session, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with contextlib.redirect_stdout(io.StringIO()):
                return value(*args, **kwargs)
        return call


def local_session(model_dir: str, fold, checkpoint: str, device, threads: int, torch_compile: bool):
    """nnInteractive's own session on this machine (undo off: the simulated user never undoes)."""
    from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

    with contextlib.redirect_stdout(io.StringIO()):
        session = nnInteractiveInferenceSession(device=device, use_torch_compile=torch_compile, verbose=False,
                                                torch_n_threads=threads, do_autozoom=True, enable_undo=False)
        session.initialize_from_trained_model_folder(model_dir, fold, checkpoint)
    return _Quiet(session)


def box_in_3d(session, mode: str) -> bool:
    takes_3d = bool((session.supported_interactions or {}).get("bbox3d", False))
    if mode == "3d" and not takes_3d:
        raise EvaluationError("the model takes only 2D boxes (its capabilities say bbox3d: false); use --box 2d or "
                              "--box auto")
    return takes_3d if mode == "auto" else mode == "3d"


# ---------------------------------------------------------------------------------------------------- the user

class ObjectRun:
    """One object of one case under one protocol: the prompts, and the figures after each."""

    def __init__(self, session, buffer: np.ndarray, gt: np.ndarray, spacing: Sequence[float], settings: Settings,
                 box_3d: bool):
        self.s, self.buffer, self.gt, self.spacing, self.settings, self.box_3d = (
            session, buffer, gt, spacing, settings, box_3d)
        thickness = list(session.preferred_scribble_thickness or (2, 2, 2))
        self.thickness = thickness[1:] if len(thickness) == 3 else thickness[:2]

    def prompt(self, protocol: str, step: int) -> Tuple[str, str, Optional[Callable[[], object]]]:
        """``(prompt, where, call)`` of this step; ``call`` None when the mask is already right."""
        if protocol == "cvpr25" and step == 0:
            box = box_prompt(self.gt, self.box_3d)
            return ("box3d" if not box.is_2d else "box2d", json.dumps(box.bbox),
                    lambda: self.s.add_bbox_interaction(box.bbox, include_interaction=True))
        if protocol == "scribbles":
            sc = scribble_prompt(self.buffer, self.gt, self.thickness)
            if sc is None:
                return "none", "", None
            where = json.dumps({"through": list(sc.click.coords), "bbox": sc.bbox, "voxels": int(sc.mask.sum())})
            return ("scribble" + "-+"[sc.positive], where,
                    lambda: self.s.add_scribble_interaction(sc.mask, include_interaction=sc.positive,
                                                            interaction_bbox=sc.bbox))
        click = click_prompt(self.buffer, self.gt)
        if click is None:
            return "none", "", None
        return ("point" + "-+"[click.positive], json.dumps(list(click.coords)),
                lambda: self.s.add_point_interaction(click.coords, include_interaction=click.positive))

    def run(self, protocol: str) -> List[Dict[str, object]]:
        self.s.reset_interactions()
        rows, figures = [], None
        for step in range(self.settings.steps):
            prompt, where, call = self.prompt(protocol, step)
            seconds = 0.0
            if call is not None or figures is None:
                if call is not None:
                    t0 = time.perf_counter()
                    call()
                    seconds = time.perf_counter() - t0
                figures = (dice(self.buffer, self.gt), nsd(self.buffer, self.gt, self.spacing,
                                                           self.settings.tolerance_mm))
            rows.append({"protocol": protocol, "step": step, "prompt": prompt, "where": where,
                         "dice": "%.6f" % figures[0], "nsd": "%.6f" % figures[1], "seconds": "%.4f" % seconds})
        return rows


class Progress:
    """One line on stderr: cases done, the one running, the time left (estimated from the cases done)."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self.done = self.ran = 0
        self._width = 0

    def show(self, text: str):
        if not self.tty:
            return
        elapsed = time.monotonic() - self.started
        left = "" if not self.ran else "  ~%s left" % _duration(elapsed / self.ran * (self.total - self.done))
        filled = int(20 * self.done / max(self.total, 1))
        line = "[%s%s] %d/%d cases  %s%s" % ("#" * filled, "." * (20 - filled), self.done, self.total, text, left)
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def case_done(self, name: str, ran: bool, note: str = ""):
        self.done += 1
        self.ran += ran
        if self.tty:
            self.show("")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write("%d/%d %s %s%s\n" % (self.done, self.total, name, "done" if ran else "already done",
                                                   note))
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return "%dh%02dm" % (seconds // 3600, seconds // 60 % 60) if seconds >= 3600 else "%dm%02ds" % (
        seconds // 60, seconds % 60)


def evaluate(session, cases: Sequence[D.Case], protocols: Sequence[str], settings: Settings, steps: StepsFile,
             labels: Optional[Iterable[int]] = None, progress: Optional[Progress] = None) -> int:
    """Run every object of ``cases`` not yet in ``steps`` under each protocol; returns the number of objects run."""
    box_3d = box_in_3d(session, settings.box) if "cvpr25" in protocols else False
    only = None if labels is None else list(labels)
    progress = progress or Progress(len(cases))
    ran = 0
    for case in cases:
        gt_map, spacing = D.load_labels(case)
        todo = [(v, p) for v in D.objects(gt_map, only) for p in protocols if not steps.done(case.name, v, p)]
        if not todo:
            progress.case_done(case.name, False)
            continue
        progress.show("%s: reading" % case.name)
        image = D.load_image(case, gt_map.shape)
        buffer = np.zeros(gt_map.shape, np.uint8)
        progress.show("%s: sending the image" % case.name)
        session.set_image(image)
        session.set_target_buffer(buffer)
        # Wait for the image's preprocessing here, so the first prompt's time is the prompt's own.
        session.add_point_interaction([n // 2 for n in gt_map.shape], include_interaction=True, run_prediction=False)
        del image
        for value, protocol in todo:
            progress.show("%s: label %d, %s" % (case.name, value, protocol))
            rows = ObjectRun(session, buffer, gt_map == value, spacing, settings, box_3d).run(protocol)
            steps.add([dict(r, case=case.name, label=value) for r in rows])
            ran += 1
        progress.case_done(case.name, True, " (%d object runs)" % len(todo))
    return ran
