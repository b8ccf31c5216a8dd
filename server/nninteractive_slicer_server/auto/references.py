"""``from:`` references in ``series_folders``: a stage of a request reads an earlier stage's output as one of its input
channels, as the established nnU-Net server defines them.

* ``from:<model>``: that model's label map (as a float channel, resampled linearly like any image);
* ``from:<model>=<k>``: 1 where the label map holds label ``k``, else 0 (a mask: resampled by nearest neighbour);
* ``from:<model>[<i>]``: channel ``i`` (from 0) of that model's probability map, as ``probabilities.nii.gz`` holds
  it (one channel per label of the map, each masked by its label; one channel with ``class_idx`` and
  ``proba_threshold``). The referenced stage computes its probabilities for this even without ``save_proba_map``.

``<model>`` is a model id, alias or name. The reference reads the first earlier stage of the request that runs that
model. When there is none, the model is run first: a stage is inserted just before the one that refers to it (once,
however many references name it), on that stage's first series (as many as the model has channels: ``from:``
entries are skipped) and with the model's own ``default_args`` for every per-stage field. Every stage, inserted ones
included, is a stage of the cascade: ``cascade_mode`` applies between it and the next, and its outputs are written to
``stage_<i>/``. A model whose ``default_args.series_folders`` lists ``from:`` entries gets them appended when the
request gives that stage fewer series (the established server's injection).

*Ours*: a reference names its stage by the model it runs (id, alias or name all match), and several references to
models not in the request each get their own inserted stage; the established server compares the names as written
and counts the inserted stages from the referring stage's position, so two insertions before one stage read the
wrong one there. A label or channel that does not exist is a 400 here, an empty input or a failure there.
"""

import re
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Set

import numpy as np

from ..validate import BadInput
from . import io as aio

PREFIX = "from:"
_SYNTAX = re.compile(r"^from:(?P<model>[^=\[\]]+?)(?:=(?P<equal>\d+)|\[(?P<index>\d+)\])?$")
SYNTAX_HELP = "from:<model>, from:<model>=<label> or from:<model>[<channel>]"


@dataclass(frozen=True)
class Reference:
    """One ``from:`` entry: as written (``text``), the model it names, its selector, and (once ``expand`` placed it)
    the index of the stage whose output it reads."""

    text: str
    model: str
    equal: Optional[int] = None
    index: Optional[int] = None
    stage: Optional[int] = None

    def __str__(self):
        return self.text


def is_reference(entry):
    return isinstance(entry, str) and entry.startswith(PREFIX)


def parse(entry):
    """The ``Reference`` an entry writes; ``BadInput`` naming the syntax when it is malformed."""
    m = _SYNTAX.match(entry.strip())
    if not m or not m.group("model").strip():
        raise BadInput("series_folders: %r is not a reference to another model's output: write %s"
                       % (entry, SYNTAX_HELP))
    equal, index = m.group("equal"), m.group("index")
    return Reference(entry, m.group("model").strip(), int(equal) if equal is not None else None,
                     int(index) if index is not None else None)


@dataclass
class Expansion:
    """The request's stages after ``expand``: ``specs`` and ``series`` per stage (paths as written, ``Reference``
    entries placed), ``inserted`` (indexes of the stages added for references, ascending) and ``probabilities``
    (indexes of the stages whose probability map a reference reads)."""

    specs: List[Any]
    series: List[List[Any]]
    inserted: List[int]
    probabilities: Set[int]

    def per_stage(self, values):
        """A per-stage list of the request's stages, with None (the model's default) for the inserted ones."""
        out = list(values)
        for pos in self.inserted:
            out.insert(pos, None)
        return out

    @property
    def referenced(self):
        return {e.stage for entries in self.series for e in entries if isinstance(e, Reference)}


def _injected(spec, entries):
    """The stage's series with the ``from:`` entries of the model's ``default_args.series_folders`` that lie past the
    series the request gave appended (established: a model declares the outputs it takes as extra channels)."""
    defaults = spec.default_args.get("series_folders")
    entries = list(entries)
    if isinstance(defaults, (list, tuple)) and all(isinstance(d, str) for d in defaults):
        for k, d in enumerate(defaults):
            if is_reference(d) and len(entries) <= k:
                entries.append(d)
    return entries


def expand(registry, specs, series, channels_of):
    """Place every ``from:`` reference of ``series`` (one list per stage of ``specs``) on a stage, inserting the
    stages they need (see the module's notes). ``channels_of(spec)``: the model's input channel names (None when
    unknown). ``UnknownModel`` (400) for a model the registry lacks, ``BadInput`` for a malformed reference, a
    label the model does not output, or too few series to run an inserted model on."""
    out_specs, out_series, inserted, probabilities = [], [], [], set()
    for i, spec in enumerate(specs):
        entries = _injected(spec, series[i])
        plain = [e for e in entries if not is_reference(e)]
        placed = []
        for entry in entries:
            if not is_reference(entry):
                placed.append(entry)
                continue
            ref = parse(entry)
            target = registry.get(ref.model)  # UnknownModel: 400 naming the known ids
            stage = next((j for j, s in enumerate(out_specs) if s.id == target.id), None)
            if stage is None:
                n = len(channels_of(target) or [None])
                if len(plain) < n:
                    raise BadInput("series_folders: %r runs model %r first, on the first %d series of stage %d; that "
                                   "stage gives %d series besides its references" % (entry, target.id, n, i,
                                                                                     len(plain)))
                out_specs.append(target)
                out_series.append(plain[:n])
                inserted.append(len(out_specs) - 1)
                stage = len(out_specs) - 1
            if ref.equal is not None and ref.equal != 0:
                values = _label_values(registry, target)
                if values and ref.equal not in values:
                    raise BadInput("series_folders: %r: model %r has no label %d (its labels: %s)"
                                   % (entry, target.id, ref.equal, values))
            if ref.index is not None:
                probabilities.add(stage)
            placed.append(replace(ref, stage=stage))
        out_specs.append(spec)
        out_series.append(placed)
    return Expansion(out_specs, out_series, inserted, probabilities)


def _label_values(registry, spec):
    """The label values a model's map can hold (its dataset.json; its described segments when that is unreadable)."""
    from .registry import dataset_labels

    try:
        return sorted(dataset_labels(registry.result_folder(spec)).values())
    except ValueError:
        return [s.value for s in registry.segments(spec)]


class StageOutputs:
    """The outputs of a run's stages that later stages' references read: a referenced stage's label map and, when a
    reference takes a channel, its probability map, each with the stage's reference image (its grid)."""

    def __init__(self, expansion):
        self._wanted = expansion.referenced
        self._kept = {}

    def keep(self, stage, labels, probabilities, grid):
        """What stage ``stage`` produced (``labels`` ``[k, j, i]``; ``probabilities`` ``[channels, k, j, i]`` or
        None), kept only when a later reference reads it."""
        if stage in self._wanted:
            self._kept[stage] = (labels, probabilities, grid)

    def series(self, ref):
        """The input a reference stands for, as an ``io.Series`` (no DICOM files)."""
        labels, probabilities, grid = self._kept[ref.stage]
        if ref.equal is not None:
            array = (labels == ref.equal).astype(np.uint8)
        elif ref.index is not None and probabilities is None:
            array = np.zeros(labels.shape, dtype=np.float32)  # a stage skipped (empty crop): it predicted nothing
        elif ref.index is not None:
            n = len(probabilities)
            if ref.index >= n:
                raise BadInput("series_folders: %r: the probability map of stage %d has %d channel(s) (0 to %d)"
                               % (ref.text, ref.stage, n, n - 1))
            array = np.asarray(probabilities[ref.index], dtype=np.float32)
        else:
            array = labels.astype(np.float32)
        return aio.Series(path=ref.text, image=aio.from_array(array, grid))
