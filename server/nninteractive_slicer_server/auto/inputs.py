"""What an automatic run reads, known before any pixel is read: every input's size from its header, checked against
``--max-image-voxels``, and the memory the run's reading holds reserved from the server's memory budget for the
whole run.

    inputs = prepare(plan, files, registry, limits, budget)     # headers, sizes, one reservation
    try:
        ... io.read_input(inputs.info(path)) ...
    finally:
        inputs.release()

``prepare`` takes the server's private copy of every series of every stage and of the masks (``crop_from``,
``intersect_with``) through ``files`` (``paths.ConfinedFiles.read``: confined, never through a link), probes them
with ``io.probe_series`` / ``io.probe_image`` (headers only, accepted formats only; DICOM series checked by
``dicomseries``), refuses an input over the voxel limit (``TooLarge``, 413, naming it), then reserves ``read_bytes``
from the budget in one call (``TooLarge`` when it can never fit, ``BudgetFull`` 503 + Retry-After when it cannot
now).

``read_bytes`` is an upper bound on what ``pipeline.run_study`` holds besides the prediction itself (whose working
memory ``AutoSegmenter.predict`` accounts for): the images read (kept for the whole run, each series once), and per
stage, on the grid of its first series: the later channels resampled, the float32 arrays and their stacked copy,
the masks read and resampled, the post-processing's temporaries, and the full-grid labels and probability maps with
the copies made to write them. A stage's arrays live until the next stage replaces them, so the two largest stages
are counted together. Not counted: highdicom's and rt-utils' own buffers while they encode a DICOM SEG / RTSTRUCT.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..validate import BadInput
from . import io as aio
from . import references

F32 = 4  # bytes of a float32 voxel


@dataclass
class RunInputs:
    """The probed inputs of one run (``info(path)``), the notes their checks left (for the response's warnings), the
    bytes reserved for reading them (``nbytes``) and the reservation (``release`` gives it back, once)."""

    infos: Dict[str, "aio.Input"] = field(default_factory=dict)
    masks: Dict[str, "aio.Input"] = field(default_factory=dict)
    nbytes: int = 0
    reservation: Optional[object] = None

    def info(self, path):
        return self.infos[path]

    @property
    def notes(self) -> List[str]:
        out = []
        for info in list(self.infos.values()) + list(self.masks.values()):
            out.extend(n for n in info.notes if n not in out)
        return out

    def release(self):
        if self.reservation is not None:
            self.reservation.release()


def prepare(plan, files, registry=None, limits=None, budget=None):
    """Probe the inputs of ``plan`` (a ``pipeline.Plan``), check them against ``limits`` and reserve their reading
    from ``budget`` (either may be None: not checked / not reserved). ``files`` (``paths.ConfinedFiles`` or
    ``LocalFiles``) gives the copies that are probed and later read (``Input.path``)."""
    opts = plan.options
    is_dicom = opts.get("is_dicom", False)
    out = RunInputs()
    for stage in plan.stages:
        for path, folder in zip(stage["paths"], stage["folders"]):
            if isinstance(path, references.Reference):
                continue  # an earlier stage's output: counted with that stage (stage_bytes), read from no file
            if path not in out.infos:
                if not is_dicom and files.kind(path, "series_folders") == "dir":
                    raise BadInput("input %s is a folder; a folder is read as a DICOM series only when is_dicom is "
                                   "set" % folder)
                out.infos[path] = aio.probe_series(files.read(path, "series_folders"), is_dicom,
                                                   bvalue=opts.get("bvalue_for_filtering"), name=folder)
    for key in ("crop_from", "intersect_with"):
        path = opts.get(key)
        if isinstance(path, str):
            out.masks[key] = aio.probe_image(files.read(path, key), name="%s %s" % (key, plan.echo.get(key) or path))
    if limits is not None:
        for info in list(out.infos.values()) + list(out.masks.values()):
            limits.check_image_voxels(info.voxels, info.shape, what="the image of input %r" % info.name)
    out.nbytes = read_bytes(plan, out, registry)
    if budget is not None and out.nbytes:
        largest = max(out.infos.values(), key=lambda i: i.voxels)
        what = "reading the study (%d input(s), the largest %s)" % (len(out.infos) + len(out.masks),
                                                                   "x".join(str(s) for s in largest.size))
        out.reservation = budget.reserve(out.nbytes, what, user=files.user)  # against the user's share
    return out


def _probability_channels(registry, stage):
    args = stage.get("args") or {}
    idx = args.get("class_idx")
    if args.get("proba_threshold") is not None and idx:
        return 1
    if idx:
        return len(idx)
    try:
        return max(1, len(registry.segments(stage["spec"]))) if registry is not None else 2
    except Exception:  # noqa: BLE001 -- a model whose labels cannot be listed fails later, with its own message
        return 2


def stage_bytes(plan, stage, i, inputs, registry):
    """What stage ``i`` holds beside the images read and the prediction (see the module's notes)."""
    opts = plan.options
    infos = [inputs.infos[p] for p in stage["paths"] if not isinstance(p, references.Reference)]
    refs = len(stage["paths"]) - len(infos)
    if not infos:  # every channel an earlier stage's output: that stage's grid, at most the largest input's
        infos = [max(inputs.infos.values(), key=lambda x: x.voxels)]
    ref = infos[0]
    v = ref.voxels
    widest = max(x.pixel_bytes for x in infos)
    total = refs * 2 * v * F32  # a from: channel: the earlier output as float32, resampled onto this grid
    for other in infos[1:]:  # a later channel on the first one's grid (a label image keeps its type)
        if not other.same_grid(ref):
            total += v * max(F32, other.pixel_bytes) + other.nbytes  # the copy, and np.unique's look at it
    total += len(infos) * v * F32 * 2 + v * widest  # float32 arrays, their stacked copy, one array before astype
    mask_bytes = 3 * v  # a mask on the grid: uint8 image, its array, the boolean
    for key in ("crop_from", "intersect_with"):
        m = inputs.masks.get(key)
        if m is not None:
            total += m.nbytes + 2 * v * m.pixel_bytes + v
        elif i > 0 and (key == "crop_from" and "crop" in opts.get("cascade_mode", ()) or
                        key == "intersect_with" and "intersect" in opts.get("cascade_mode", ())):
            total += mask_bytes
    if opts.get("intersect_with") is not None or (i > 0 and "intersect" in opts.get("cascade_mode", ())):
        total += 16 * v  # keep_intersecting: components (int32), two float32 sums, booleans, the labels' copy
    if stage.get("remove_small") is not None:
        total += 11 * v  # remove_small_objects: the labels' copy, a boolean, components, a float32 count
    total += 6 * v + mask_bytes  # labels (up to uint16), the written copy, its image; the next stage's mask
    if opts.get("save_proba_map"):
        total += 4 * _probability_channels(registry, stage) * v * F32  # the prediction's, the map, two write copies
    return total


def read_bytes(plan, inputs, registry=None):
    """An upper bound on the bytes the run's reading holds at once (see the module's notes)."""
    held = sum(info.nbytes for info in inputs.infos.values())
    per_stage = sorted((stage_bytes(plan, st, i, inputs, registry) for i, st in enumerate(plan.stages)),
                       reverse=True)
    return held + sum(per_stage[:2])
