"""The model registry: ``model-serve-spec.yaml``, in the format nnU-Net model servers already use.

A spec looks like this (every field of an entry but ``id`` and one of ``rel_path`` / ``totalseg_task`` optional)::

    model_folder: /models/nnunet            # nnU-Net v2 result folders live somewhere under here
    models:
      - id: prostate_zone_mri               # what requests name (nnunet_id)
        rel_path: prostate_zone_model       # a substring of the result folder's path under model_folder
        name: "Prostate zone segmentation"  # also accepted as a name for the model
        aliases: [prostate_zones]
        metadata:
          path: metadata/prostate-zones.json   # a DCMQI segmentation template (wins over inline fields)
          # or inline: algorithm_name, algorithm_version, manufacturer, series_description, segment_names, ...
        min_mem: 4000                       # MiB of free GPU memory to wait for before running
        default_args: {use_folds: [0, 1, 2, 3, 4], tta: false, checkpoint_name: checkpoint_best.pth,
                       proba_threshold: 0.1, min_confidence: 0.5, class_idx: 1}
      - id: total_fast_ct
        totalseg_task: total_fast           # weights fetched by TotalSegmentator's own downloader on first use

Where the spec comes from (``spec_source``): ``--model-serve-spec PATH``, else ``$MODEL_SERVE_SPEC``, else
``./model-serve-spec.yaml`` when the working directory has one (the established server's default); the server logs
which. ``$OVERRIDE_MODEL_FOLDER``, when set, replaces the spec's ``model_folder`` (as the established server does, for
containers that mount the models elsewhere). A relative ``metadata.path`` is looked up beside the spec first, then in
the current directory (where the established server looks). ``rel_path`` is matched against each result folder's
path relative to ``model_folder`` (a folder with ``dataset.json`` and a ``fold_*`` folder); when several match, the
shortest path wins (a warning says so).

Errors: ``SpecError`` (the spec is wrong; names the file, the entry and the field; at load), ``UnknownModel`` (a
request names a model that is not there; a ``BadInput``, so HTTP 400, naming the known ids), ``ModelUnavailable``
(registered but cannot run here: TotalSegmentator not installed, folder gone; HTTP 503).
"""

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import Unavailable
from ..validate import BadInput

log = logging.getLogger("nninteractive_slicer_server")

SPEC_ENV = "MODEL_SERVE_SPEC"
DEFAULT_SPEC = "model-serve-spec.yaml"  # looked for in the working directory when neither flag nor variable names one
MODEL_FOLDER_ENV = "OVERRIDE_MODEL_FOLDER"
TOTALSEG_EXTRA = 'pip install "nninteractive-slicer-server[totalsegmentator]"'
TOTALSEG_WEIGHTS_ENV = "TOTALSEG_WEIGHTS_PATH"

TOP_LEVEL_FIELDS = {"model_folder", "models", "load_timeout_min"}
ENTRY_FIELDS = {"id", "rel_path", "name", "aliases", "metadata", "min_mem", "default_args", "totalseg_task",
                "is_totalseg"}
# The request fields of the established /infer body that a spec may give defaults for.
DEFAULT_ARG_FIELDS = {
    "series_folders", "use_folds", "tta", "checkpoint_name", "proba_threshold", "min_confidence", "class_idx",
    "save_proba_map", "is_dicom", "min_intersection", "crop_padding", "remove_objects_smaller_than", "cascade_mode",
    "save_nifti_inputs", "save_rt_struct_output", "bvalue_for_filtering", "suffix", "tmp_dir", "intersect_with",
    "crop_from", "flip_xy", "study_path", "output_dir", "nnunet_id",
}
INLINE_METADATA_FIELDS = {
    "path", "algorithm_name", "algorithm_version", "manufacturer", "manufacturer_model_name", "series_description",
    "body_part_examined", "segment_names", "clinical_trial_series_id", "clinical_trial_time_point_id",
    "series_number", "instance_number",
}
SEGMENT_NAME_FIELDS = {"name", "number", "label", "tracking_id", "code", "scheme", "category_number"}

# Distinct, readable colours for labels whose metadata gives none (RGB 0-255), in label order.
PALETTE = [(216, 101, 79), (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (221, 130, 101),
           (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70),
           (200, 200, 235), (250, 250, 210), (244, 214, 49), (0, 151, 206), (216, 101, 79), (183, 156, 220),
           (183, 214, 211), (152, 189, 207), (111, 184, 210), (178, 212, 242), (68, 172, 100), (111, 197, 131)]


# ---------------------------------------------------------------------------------------------------------- errors

class SpecError(ValueError):
    """The spec is wrong. ``entry`` says which model (``models[2] (id 'x')``, or ``top level``), ``field`` which
    field (dotted: ``metadata.path``, ``default_args.use_folds``)."""

    def __init__(self, spec_path, entry, field_name, problem):
        self.spec_path, self.entry, self.field, self.problem = spec_path, entry, field_name, problem
        ValueError.__init__(self, "%s: %s, field '%s': %s" % (spec_path or "model spec", entry or "top level",
                                                            field_name, problem))


class UnknownModel(BadInput, LookupError):
    """A request names no registered model (HTTP 400); the message lists the known ids and aliases."""

    def __init__(self, name, known_ids, aliases=None):
        self.name, self.known_ids = name, list(known_ids)
        extra = ""
        if aliases:
            extra = "; aliases: " + ", ".join("%s (%s)" % (a, i) for a, i in sorted(aliases.items()))
        BadInput.__init__(self, "unknown model %r; known model ids: %s%s"
                          % (name, ", ".join(self.known_ids) or "none (the registry is empty)", extra))


class ModelUnavailable(Unavailable):
    """A registered model cannot run here (an optional package missing, its folder gone); HTTP 503."""


# ---------------------------------------------------------------------------------------------------------- records

@dataclass
class Segment:
    """One label of a model's output: its value in the label map, display name, colour and (when the metadata has
    codes) its DICOM coded terminology: ``{"category": code, "type": code, "type_modifier": code,
    "anatomic_region": code, "anatomic_region_modifier": code}``, each code ``{"CodeValue", "CodingSchemeDesignator",
    "CodeMeaning"}`` (the keys present are those the metadata gives)."""

    value: int
    name: str
    color: Tuple[int, int, int]
    terminology: Optional[Dict[str, Dict[str, str]]] = None
    description: Optional[str] = None

    def as_dict(self):
        d = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.description and self.description != self.name:
            d["description"] = self.description
        if self.terminology:
            d["terminology"] = self.terminology
        return d


@dataclass
class ModelSpec:
    """One entry of the spec, checked. ``metadata`` is the entry's metadata mapping as written; ``metadata_path``
    the resolved template file when it names one (it then wins over the inline fields)."""

    id: str
    index: int
    name: str
    rel_path: Optional[str] = None
    aliases: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)
    metadata_path: Optional[str] = None
    min_mem: Optional[float] = None  # MiB
    default_args: Dict[str, Any] = field(default_factory=dict)
    totalseg_task: Optional[Any] = None
    is_totalseg: bool = False

    @property
    def label(self):
        return "models[%d] (id %r)" % (self.index, self.id)


def spec_source(cli_value=None, environ=None, cwd=None):
    """``(path, where_from)`` of the spec to load: ``--model-serve-spec`` when given, else ``$MODEL_SERVE_SPEC``, else
    ``model-serve-spec.yaml`` in ``cwd`` (default: the working directory) when it exists; ``(None, None)`` for no
    registry. ``where_from`` says which, for the log."""
    environ = os.environ if environ is None else environ
    if cli_value:
        return cli_value, "--model-serve-spec"
    if environ.get(SPEC_ENV):
        return environ[SPEC_ENV], "$%s" % SPEC_ENV
    here = os.path.join(os.getcwd() if cwd is None else cwd, DEFAULT_SPEC)
    if os.path.isfile(here):
        return here, "./%s in the working directory (neither --model-serve-spec nor $%s is set)" % (DEFAULT_SPEC,
                                                                                                   SPEC_ENV)
    return None, None


def spec_path_from(cli_value=None, environ=None, cwd=None):
    """The spec to load (``spec_source``'s path), or None (no registry)."""
    return spec_source(cli_value, environ, cwd)[0]


def load_registry(path, check_files=True, model_folder=None, environ=None):
    """Read and check the spec at ``path``. With ``check_files`` (the server's start-up, the validate command) the
    model folder must exist, every ``rel_path`` must find a result folder and every metadata template must be a
    readable DCMQI template; TotalSegmentator entries are checked only for form (their weights come on first use).
    ``model_folder`` overrides the spec's; without it ``$OVERRIDE_MODEL_FOLDER`` does when set (as in the
    established server)."""
    import yaml

    environ = os.environ if environ is None else environ
    if model_folder is None and environ.get(MODEL_FOLDER_ENV):
        model_folder = os.path.abspath(os.path.expanduser(environ[MODEL_FOLDER_ENV]))  # as the shell meant it
        log.info("model registry: model_folder %s from $%s (instead of the spec's)", model_folder, MODEL_FOLDER_ENV)
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise SpecError(path, None, "(file)", "cannot be read (%s)" % (exc.strerror or exc))
    except yaml.YAMLError as exc:
        raise SpecError(path, None, "(file)", "is not valid YAML (%s)" % str(exc).replace("\n", " "))
    return Registry(data, path=path, check_files=check_files, model_folder=model_folder)


# ---------------------------------------------------------------------------------------------------------- registry

class Registry:
    """The registered models. Look one up with ``get(id_or_alias_or_name)``; everything else takes the same."""

    def __init__(self, data, path=None, base_dir=None, check_files=True, model_folder=None):
        self.path = path
        self.base_dir = base_dir or (os.path.dirname(path) if path else os.getcwd())
        self.warnings = []
        self._lock = threading.Lock()
        self._folders = {}  # model id -> resolved result folder
        self._scan = None
        self.unavailable = {}  # model id -> [why its files cannot serve, when last checked] (check_models)
        self.clock = time.monotonic
        self.models, self.aliases = {}, {}
        self._parse(data, model_folder)
        if check_files:
            self.check_files()

    # ------------------------------------------------------------------ parsing

    def _err(self, entry, field_name, problem):
        return SpecError(self.path, entry, field_name, problem)

    def _warn(self, entry, field_name, problem):
        msg = "%s: %s, field '%s': %s" % (self.path or "model spec", entry or "top level", field_name, problem)
        self.warnings.append(msg)
        log.warning("%s", msg)

    def _parse(self, data, model_folder):
        if not isinstance(data, dict):
            raise self._err(None, "(file)", "must be a YAML mapping with 'model_folder' and 'models', got %s"
                            % type(data).__name__)
        for key in sorted(set(data) - TOP_LEVEL_FIELDS):
            self._warn(None, key, "unknown field, ignored")
        folder = model_folder if model_folder is not None else data.get("model_folder")
        if not isinstance(folder, str) or not folder.strip():
            raise self._err(None, "model_folder", "required: the folder under which the nnU-Net result folders "
                            "are, got %r" % (folder,))
        folder = os.path.expanduser(folder)
        self.model_folder = os.path.abspath(folder if os.path.isabs(folder) else os.path.join(self.base_dir, folder))
        timeout = data.get("load_timeout_min")
        if timeout is not None and (not _is_number(timeout) or timeout <= 0):
            raise self._err(None, "load_timeout_min", "must be a positive number of minutes, got %r" % (timeout,))
        self.load_timeout_min = timeout
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            raise self._err(None, "models", "required: a non-empty list of model entries, got %r"
                            % (type(entries).__name__ if entries is not None else None,))
        names = {}
        for i, raw in enumerate(entries):
            spec = self._parse_entry(i, raw)
            if spec.id in self.models or spec.id in self.aliases:
                raise self._err(spec.label, "id", "%r is already used by %s" % (
                    spec.id, self.models[spec.id].label if spec.id in self.models else "an alias"))
            self.models[spec.id] = spec
            for alias in spec.aliases:
                if alias == spec.id:
                    continue
                if alias in self.models or alias in self.aliases:
                    other = self.models.get(alias) or self.models[self.aliases[alias]]
                    raise self._err(spec.label, "aliases", "%r is already the id or an alias of %s"
                                    % (alias, other.label))
                self.aliases[alias] = spec.id
            names.setdefault(spec.name, []).append(spec.id)
        # A model's name is accepted too (as the established server does) when it names one model only.
        self.names = {}
        for name, ids in names.items():
            if len(ids) == 1 and name not in self.models and name not in self.aliases:
                self.names[name] = ids[0]

    def _parse_entry(self, i, raw):
        where = "models[%d]" % i
        if not isinstance(raw, dict):
            raise self._err(where, "(entry)", "must be a mapping with at least 'id', got %r" % (raw,))
        mid = raw.get("id")
        if not isinstance(mid, str) or not mid.strip():
            raise self._err(where, "id", "required: a non-empty string, got %r" % (mid,))
        where = "models[%d] (id %r)" % (i, mid)
        for key in sorted(set(raw) - ENTRY_FIELDS):
            self._warn(where, key, "unknown field, ignored (model defaults go under default_args)"
                       if key in DEFAULT_ARG_FIELDS else "unknown field, ignored")
        task = raw.get("totalseg_task")
        if task is not None and not (isinstance(task, str) and task.strip()) and not (
                isinstance(task, int) and not isinstance(task, bool) and task > 0):
            raise self._err(where, "totalseg_task", "must be a TotalSegmentator task name (e.g. total_fast) or "
                            "task id, got %r" % (task,))
        is_ts = raw.get("is_totalseg", False)
        if not isinstance(is_ts, bool):
            raise self._err(where, "is_totalseg", "must be true or false, got %r" % (is_ts,))
        rel = raw.get("rel_path")
        if task is None:
            if not isinstance(rel, str) or not rel.strip():
                raise self._err(where, "rel_path", "required (unless totalseg_task is given): a part of the path of "
                                "the model's nnU-Net result folder under model_folder, got %r" % (rel,))
        elif rel is not None and not (isinstance(rel, str) and rel.strip()):
            raise self._err(where, "rel_path", "must be a non-empty string, got %r" % (rel,))
        name = raw.get("name")
        if name is None:
            name = "totalseg_%s" % task if task is not None else mid
        elif not isinstance(name, str) or not name.strip():
            raise self._err(where, "name", "must be a non-empty string, got %r" % (name,))
        aliases = raw.get("aliases", [])
        if aliases is None:
            aliases = []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            raise self._err(where, "aliases", "must be a list of non-empty strings, got %r" % (aliases,))
        min_mem = raw.get("min_mem")
        if min_mem is not None and (not _is_number(min_mem) or min_mem < 0):
            raise self._err(where, "min_mem", "must be a number of MiB (0 or more), got %r" % (min_mem,))
        metadata, metadata_path = self._parse_metadata(where, raw.get("metadata"))
        default_args = self._parse_default_args(where, raw.get("default_args"))
        return ModelSpec(id=mid, index=i, name=name, rel_path=rel, aliases=list(aliases), metadata=metadata,
                         metadata_path=metadata_path, min_mem=min_mem, default_args=default_args,
                         totalseg_task=task, is_totalseg=bool(is_ts or task is not None))

    def _parse_metadata(self, where, meta):
        if meta is None:
            return {}, None
        if not isinstance(meta, dict):
            raise self._err(where, "metadata", "must be a mapping: {path: TEMPLATE.json} or inline fields "
                            "(algorithm_name, segment_names, ...), got %r" % (meta,))
        for key in sorted(set(meta) - INLINE_METADATA_FIELDS):
            self._warn(where, "metadata.%s" % key, "unknown field, ignored")
        path = meta.get("path")
        if path is not None:
            if not isinstance(path, str) or not path.strip():
                raise self._err(where, "metadata.path", "must be the path of a DCMQI template JSON, got %r" % (path,))
            return dict(meta), self._find_metadata(path)
        for key in INLINE_METADATA_FIELDS - {"path", "segment_names"}:
            value = meta.get(key)
            if value is not None and not isinstance(value, (str, int, float)):
                raise self._err(where, "metadata.%s" % key, "must be a string, got %r" % (value,))
        names = meta.get("segment_names")
        if names is not None:
            if not isinstance(names, list):
                raise self._err(where, "metadata.segment_names", "must be a list of names or of mappings with "
                                "'name', got %r" % (names,))
            for j, s in enumerate(names):
                f = "metadata.segment_names[%d]" % j
                if isinstance(s, str):
                    if not s.strip():
                        raise self._err(where, f, "is empty")
                    continue
                if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"].strip():
                    raise self._err(where, f, "must be a name or a mapping with a 'name', got %r" % (s,))
                for key in sorted(set(s) - SEGMENT_NAME_FIELDS):
                    self._warn(where, "%s.%s" % (f, key), "unknown field, ignored")
                number = s.get("number")
                if number is not None and not (isinstance(number, int) and not isinstance(number, bool)
                                               and number > 0):
                    raise self._err(where, f + ".number", "must be a label value (1 or more), got %r" % (number,))
            for j, s in enumerate(names):
                self._check_snomed_name(where, "metadata.segment_names[%d]" % j, s)
        return dict(meta), None

    def _check_snomed_name(self, where, field_name, segment):
        """Warn about an inline name without a code that names no SNOMED CT concept (the established server refuses
        it; here its DICOM SEG segment is coded Tissue / Tissue)."""
        from .terminology import SCT, closest, lookup

        name = segment if isinstance(segment, str) else segment["name"]
        if isinstance(segment, dict) and (segment.get("code") is not None or (segment.get("scheme") or SCT) != SCT):
            return
        if lookup(name) is None:
            near = closest(name)
            self._warn(where, field_name, "%r names no SNOMED CT concept DICOM defines%s; its DICOM SEG segment is "
                       "coded Tissue / Tissue: give 'code' (and 'category_number') to code it"
                       % (name, " (close: %s)" % ", ".join(near) if near else ""))

    def _find_metadata(self, path):
        path = os.path.expanduser(path)
        if os.path.isabs(path):
            return path
        beside = os.path.abspath(os.path.join(self.base_dir, path))
        if os.path.exists(beside):
            return beside
        here = os.path.abspath(path)
        return here if os.path.exists(here) else beside

    def _parse_default_args(self, where, args):
        if args is None:
            return {}
        if not isinstance(args, dict):
            raise self._err(where, "default_args", "must be a mapping of request fields, got %r" % (args,))
        for key in sorted(set(args) - DEFAULT_ARG_FIELDS):
            self._warn(where, "default_args.%s" % key, "unknown request field, ignored")
        try:
            check_args(args)
        except ArgError as exc:
            raise self._err(where, "default_args.%s" % exc.field, exc.problem)
        return dict(args)

    # ------------------------------------------------------------------ checks that touch files

    def check_files(self):
        """Raise ``SpecError`` for the first entry whose files are wrong (see ``problems`` for all of them)."""
        for level, entry, field_name, problem in self.problems():
            if level == "error":
                raise self._err(entry, field_name, problem)

    def problems(self, deep=False):
        """Every problem, as ``(level, entry, field, message)`` with level ``error`` or ``warning``. ``deep``
        also compares each template's labels with the result folder's dataset.json."""
        out = []
        if not os.path.isdir(self.model_folder):
            out.append(("error", None, "model_folder", "%s is not a folder" % self.model_folder))
        for spec in self.models.values():
            if spec.metadata_path:
                try:
                    read_dcmqi_template(spec.metadata_path)
                except ValueError as exc:
                    out.append(("error", spec.label, "metadata.path", str(exc)))
            if spec.totalseg_task is not None and spec.rel_path is None:
                continue
            if not os.path.isdir(self.model_folder):
                continue
            matches = self._matches(spec)
            if not matches:
                out.append(("error", spec.label, "rel_path", "no nnU-Net result folder (a folder with dataset.json "
                            "and a fold_N folder) under %s has %r in its path" % (self.model_folder, spec.rel_path)))
                continue
            if len(matches) > 1:
                out.append(("warning", spec.label, "rel_path", "%d result folders match; using %s (the others: %s)"
                            % (len(matches), matches[0], ", ".join(matches[1:4]))))
            if deep:
                out.extend(self._deep_problems(spec, matches[0]))
        if any(s.totalseg_task is not None for s in self.models.values()) and not _totalseg_installed():
            for s in self.models.values():
                if s.totalseg_task is not None:
                    out.append(("warning", s.label, "totalseg_task", "TotalSegmentator is not installed, so this "
                                "model cannot run here: %s" % TOTALSEG_EXTRA))
        return out

    def _deep_problems(self, spec, folder):
        out = []
        try:
            labels = dataset_labels(folder)
        except ValueError as exc:
            return [("error", spec.label, "rel_path", str(exc))]
        folds = spec.default_args.get("use_folds")
        ckpt = spec.default_args.get("checkpoint_name", "checkpoint_final.pth")
        for fold in _as_list(folds) if folds is not None else []:
            p = os.path.join(folder, "fold_%s" % fold, ckpt)
            if not os.path.isfile(p):
                out.append(("error", spec.label, "default_args.use_folds", "%s does not exist" % p))
        try:
            described = [s.value for s in self._metadata_segments(spec) or []]
        except ValueError:
            described = []  # an unreadable template is reported on its own
        unknown = sorted(set(described) - set(labels.values()))
        if unknown:
            out.append(("warning", spec.label, "metadata", "describes label(s) %s that the model (%s) does not "
                        "output (its labels: %s)" % (unknown, os.path.join(folder, "dataset.json"),
                                                     sorted(labels.values()))))
        return out

    # ------------------------------------------------------------------ availability

    RECHECK_S = 30.0  # an unavailable model's files are looked at again at most this often (a request may ask)

    def check_models(self):
        """The server's start-up check: a model whose files are missing or broken (no model folder, no result
        folder for its rel_path, an unreadable metadata template) is marked unavailable with the reason and logged;
        the others serve. Returns ``{id: reason}`` of the unavailable ones."""
        found = {}
        for spec in self.models.values():
            reason = self._file_problem(spec, refresh=False)
            if reason:
                found[spec.id] = [reason, self.clock()]
                log.warning("model %r is unavailable: %s (model_folder %s); the server serves the other models",
                            spec.id, reason, self.model_folder)
        with self._lock:
            self.unavailable = found
        return {mid: r[0] for mid, r in found.items()}

    def _file_problem(self, spec, refresh=True):
        """Why ``spec``'s files cannot serve, in a sentence without server paths; None when they can."""
        if spec.metadata_path:
            try:
                read_dcmqi_template(spec.metadata_path)
            except ValueError:
                return "its metadata template (metadata.path %s) cannot be read or is invalid" % (
                    os.path.basename(spec.metadata_path))
        if spec.totalseg_task is not None and spec.rel_path is None:
            return None  # fetched by TotalSegmentator on first use
        if not os.path.isdir(self.model_folder):
            return "the registry's model_folder does not exist on this server"
        if not self._matches(spec, refresh=refresh):
            return ("no nnU-Net result folder (dataset.json, plans.json and a fold_N folder) under the registry's "
                    "model_folder has %r in its path" % spec.rel_path)
        return None

    def unavailable_reason(self, name):
        """Why the model cannot serve (None when it can). A model marked at start-up is looked at again (at most
        every ``RECHECK_S``): files an operator put right make it available without a restart."""
        spec = self.get(name)
        with self._lock:
            mark = self.unavailable.get(spec.id)
            if mark is None:
                return None
            due = self.clock() - mark[1] >= self.RECHECK_S
            if due:
                mark[1] = self.clock()
        if not due:
            return mark[0]
        reason = self._file_problem(spec)
        with self._lock:
            if reason is None:
                self.unavailable.pop(spec.id, None)
                log.info("model %r is available now", spec.id)
            else:
                mark[0] = reason
        return reason

    # ------------------------------------------------------------------ lookup

    def get(self, name):
        """The model with this id, alias or name; ``UnknownModel`` (HTTP 400) otherwise."""
        if isinstance(name, ModelSpec):
            return name
        if isinstance(name, str):
            mid = name if name in self.models else self.aliases.get(name) or self.names.get(name)
            if mid is not None:
                return self.models[mid]
        raise UnknownModel(name, list(self.models), self.aliases)

    def ids(self):
        return list(self.models)

    def __contains__(self, name):
        try:
            self.get(name)
            return True
        except UnknownModel:
            return False

    def __len__(self):
        return len(self.models)

    def merged_args(self, name, given=None):
        """The model's ``default_args`` overridden by the fields a request gave (only those it set)."""
        args = dict(self.get(name).default_args)
        args.update(given or {})
        return args

    # ------------------------------------------------------------------ folders

    def _result_folders(self, refresh=False):
        with self._lock:
            if self._scan is None or refresh:
                self._scan = find_result_folders(self.model_folder)
            return self._scan

    def _matches(self, spec, refresh=False):
        direct = os.path.join(self.model_folder, spec.rel_path)
        if is_result_folder(direct):
            return [os.path.abspath(direct)]
        found = [f for f in self._result_folders(refresh)
                 if spec.rel_path in os.path.relpath(f, self.model_folder)]
        return sorted(found, key=lambda f: (len(f), f))

    def result_folder(self, name):
        """The nnU-Net result folder of a model (for a TotalSegmentator task: downloaded now when absent).
        ``ModelUnavailable`` when it cannot be had."""
        spec = self.get(name)
        reason = self.unavailable_reason(spec)
        if reason:
            raise ModelUnavailable("model %r is unavailable on this server: %s; the other models work (GET /model_info "
                                   "says which)" % (spec.id, reason))
        with self._lock:
            found = self._folders.get(spec.id)
        if found and os.path.isdir(found):
            return found
        if spec.totalseg_task is not None and spec.rel_path is None:
            found = self._totalseg_folder(spec)
        else:
            matches = self._matches(spec) or self._matches(spec, refresh=True)
            if not matches:
                raise ModelUnavailable("model %r: no nnU-Net result folder under the server's model folder has %r "
                                       "in its path" % (spec.id, spec.rel_path))
            found = matches[0]
        with self._lock:
            self._folders[spec.id] = found
        return found

    # ------------------------------------------------------------------ labels

    def segments(self, name, resolve=True):
        """The model's labels in value order: from its metadata (a DCMQI template's segmentAttributes, or inline
        segment_names), else (or for labels the metadata leaves out, when ``resolve`` may look at the result
        folder) from TotalSegmentator's class map or the folder's dataset.json, with the default palette."""
        spec = self.get(name)
        by_value = {s.value: s for s in self._metadata_segments(spec) or []}
        if spec.totalseg_task is not None and not by_value:
            by_value = {s.value: s for s in _totalseg_segments(spec.totalseg_task)}
        if resolve and (not by_value or spec.metadata_path is None):
            try:
                labels = dataset_labels(self.result_folder(spec))
            except (ModelUnavailable, ValueError):
                labels = {}
            for label_name, value in labels.items():
                if value not in by_value:
                    by_value[value] = Segment(value, label_name, PALETTE[(value - 1) % len(PALETTE)])
        return [by_value[v] for v in sorted(by_value)]

    def _metadata_segments(self, spec):
        if spec.metadata_path:
            return dcmqi_segments(read_dcmqi_template(spec.metadata_path))
        names = spec.metadata.get("segment_names")
        if names is None:
            return None
        return inline_segments(names)

    def describe(self, name, resolve=False):
        """What a client may see of a model (no server paths): JSON-able."""
        spec = self.get(name)
        out = {"id": spec.id, "name": spec.name, "aliases": list(spec.aliases), "min_mem": spec.min_mem,
               "default_args": dict(spec.default_args), "is_totalseg": spec.is_totalseg}
        if spec.totalseg_task is not None:
            out["totalseg_task"] = spec.totalseg_task
        meta = {k: v for k, v in spec.metadata.items() if k not in ("path", "segment_names")}
        if spec.metadata_path:
            try:
                t = read_dcmqi_template(spec.metadata_path)
                meta.setdefault("series_description", t.get("SeriesDescription"))
                meta.setdefault("body_part_examined", t.get("BodyPartExamined"))
                first = (t["segmentAttributes"][0] or [{}])[0]
                if first.get("SegmentAlgorithmName"):
                    meta.setdefault("algorithm_name", first["SegmentAlgorithmName"])
            except (ValueError, KeyError, IndexError):
                pass
        out["metadata"] = meta
        try:
            out["labels"] = [s.as_dict() for s in self.segments(spec, resolve=resolve)]
        except ValueError as exc:  # a broken metadata template: said without the server's folders
            text = str(exc)
            if spec.metadata_path:
                text = text.replace(os.path.dirname(spec.metadata_path) + os.sep, "")
            out["labels"], out["labels_error"] = [], text
        return out

    # ------------------------------------------------------------------ TotalSegmentator

    def _totalseg_folder(self, spec):
        try:
            from totalsegmentator import config as ts_config
            from totalsegmentator.libs import download_pretrained_weights
        except ImportError:
            raise ModelUnavailable("model %r is the TotalSegmentator task %r, whose weights come through "
                                   "TotalSegmentator, which is not installed on this server (%s)"
                                   % (spec.id, spec.totalseg_task, TOTALSEG_EXTRA))
        task_id = totalseg_task_id(spec.totalseg_task)
        # Weights go under the model folder unless the operator chose a place (as the established server does).
        os.environ.setdefault(TOTALSEG_WEIGHTS_ENV, os.path.join(self.model_folder, "totalseg"))
        weights = str(ts_config.get_weights_dir())
        with self._lock:  # one download at a time
            try:
                download_pretrained_weights(task_id)
            except Exception as exc:
                raise ModelUnavailable("model %r: TotalSegmentator could not fetch the weights of task %s (%s: %s)"
                                       % (spec.id, task_id, type(exc).__name__, exc))
        tag = "Dataset%03d_" % task_id
        found = sorted((f for f in find_result_folders(weights) if tag in os.path.relpath(f, weights)),
                       key=lambda f: (len(f), f))
        if not found:
            raise ModelUnavailable("model %r: no result folder of TotalSegmentator task %s (%s*) under %s after the "
                                   "download" % (spec.id, task_id, tag, weights))
        return found[0]


# ---------------------------------------------------------------------------------------------------------- helpers

class ArgError(ValueError):
    def __init__(self, field_name, problem):
        self.field, self.problem = field_name, problem
        ValueError.__init__(self, "'%s' %s" % (field_name, problem))


def check_args(args):
    """Check the types of the prediction arguments this package acts on (``ArgError`` names the field)."""
    folds = args.get("use_folds")
    if folds is not None and not all(_is_fold(f) for f in _as_list(folds)):
        raise ArgError("use_folds", "must be a fold number, 'all', or a list of them, got %r" % (folds,))
    for key in ("tta", "save_proba_map", "is_dicom", "save_nifti_inputs", "save_rt_struct_output"):
        if args.get(key) is not None and not isinstance(args[key], bool):
            raise ArgError(key, "must be true or false, got %r" % (args[key],))
    ckpt = args.get("checkpoint_name")
    if ckpt is not None:
        names = _as_list(ckpt)
        if not names or not all(isinstance(c, str) and c.strip() and os.path.basename(c) == c and c not in
                                ("..", ".") for c in names):
            raise ArgError("checkpoint_name", "must be a checkpoint file name such as checkpoint_final.pth, got %r"
                           % (ckpt,))
    for key in ("proba_threshold", "min_confidence"):
        value = args.get(key)
        for v in _as_list(value) if value is not None else []:
            if v is not None and (not _is_number(v) or not 0 <= v <= 1):
                raise ArgError(key, "must be a probability between 0 and 1 (or null), got %r" % (value,))
    idx = args.get("class_idx")
    if idx is not None:
        flat = [i for v in _as_list(idx) for i in (_as_list(v) if v is not None else [])]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in flat):
            raise ArgError("class_idx", "must be a label value (1 or more) or a list of them, got %r" % (idx,))


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v not in (float("inf"),
                                                                                             float("-inf"))


def _is_fold(f):
    return (isinstance(f, int) and not isinstance(f, bool) and f >= 0) or f == "all" or (
        isinstance(f, str) and f.isdigit())


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def is_result_folder(path):
    """A folder nnUNetPredictor can load: dataset.json, plans.json and at least one fold_* folder."""
    try:
        if not (os.path.isfile(os.path.join(path, "dataset.json"))
                and os.path.isfile(os.path.join(path, "plans.json"))):
            return False
        return any(d.startswith("fold_") and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))
    except OSError:
        return False


def find_result_folders(root):
    """Every result folder under ``root`` (symbolic links followed once; fold_* folders not entered)."""
    out, seen = [], set()
    for dirpath, dirnames, _files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or "__MACOSX" in dirpath:
            dirnames[:] = []
            continue
        seen.add(real)
        if is_result_folder(dirpath):
            out.append(os.path.abspath(dirpath))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("fold_") and not d.startswith("."))
    return out


def dataset_labels(folder):
    """``{name: value}`` of a result folder's dataset.json, background left out. For region-based models the
    values are those of ``regions_class_order`` (what the label map holds)."""
    path = os.path.join(folder, "dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError("%s cannot be read (%s)" % (path, exc))
    labels = ds.get("labels")
    if not isinstance(labels, dict):
        raise ValueError("%s has no 'labels' mapping" % path)
    order = ds.get("regions_class_order")
    out, k = {}, 0
    for name, value in labels.items():
        if name == "background" or value == 0 or name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            value = order[k] if order and k < len(order) else value[-1]
        k += 1
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    return out


CODE_KEYS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
TEMPLATE_CODES = {"SegmentedPropertyCategoryCodeSequence": "category", "SegmentedPropertyTypeCodeSequence": "type",
                  "SegmentedPropertyTypeModifierCodeSequence": "type_modifier",
                  "AnatomicRegionSequence": "anatomic_region",
                  "AnatomicRegionModifierSequence": "anatomic_region_modifier"}


def read_dcmqi_template(path):
    """Read and check a DCMQI segmentation template (``ValueError`` says what is wrong and where)."""
    try:
        with open(path, encoding="utf-8") as f:
            t = json.load(f)
    except OSError as exc:
        raise ValueError("the metadata template %s cannot be read (%s)" % (path, exc.strerror or exc))
    except ValueError as exc:
        raise ValueError("the metadata template %s is not valid JSON (%s)" % (path, exc))
    if not isinstance(t, dict):
        raise ValueError("the metadata template %s must hold a JSON object" % path)
    groups = t.get("segmentAttributes")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, list) for g in groups):
        raise ValueError("the metadata template %s needs 'segmentAttributes': a list of lists of segments" % path)
    seen = set()
    for gi, group in enumerate(groups):
        for si, seg in enumerate(group):
            where = "%s segmentAttributes[%d][%d]" % (path, gi, si)
            if not isinstance(seg, dict):
                raise ValueError("%s must be an object" % where)
            lid = seg.get("labelID")
            if not isinstance(lid, int) or isinstance(lid, bool) or lid < 1:
                raise ValueError("%s: 'labelID' must be a label value (1 or more), got %r" % (where, lid))
            if lid in seen:
                raise ValueError("%s: labelID %d appears twice" % (where, lid))
            seen.add(lid)
            for key in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
                if key not in seg:
                    raise ValueError("%s: '%s' is required" % (where, key))
            for key in TEMPLATE_CODES:
                if key in seg:
                    code = seg[key]
                    if not isinstance(code, dict) or not all(isinstance(code.get(k), str) and code[k]
                                                             for k in CODE_KEYS):
                        raise ValueError("%s: '%s' must have %s" % (where, key, ", ".join(CODE_KEYS)))
            rgb = seg.get("recommendedDisplayRGBValue")
            if rgb is not None and not (isinstance(rgb, list) and len(rgb) == 3 and all(
                    isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb)):
                raise ValueError("%s: 'recommendedDisplayRGBValue' must be 3 integers 0-255, got %r" % (where, rgb))
            label = seg.get("SegmentLabel", seg.get("SegmentDescription"))
            if label is not None and not isinstance(label, str):
                raise ValueError("%s: 'SegmentLabel' must be a string" % where)
    if not seen:
        raise ValueError("the metadata template %s describes no segment" % path)
    return t


def dcmqi_segments(template):
    out = []
    for group in template["segmentAttributes"]:
        for seg in group:
            value = seg["labelID"]
            name = seg.get("SegmentLabel") or seg.get("SegmentDescription") or \
                seg["SegmentedPropertyTypeCodeSequence"]["CodeMeaning"]
            rgb = seg.get("recommendedDisplayRGBValue")
            term = {TEMPLATE_CODES[k]: {c: seg[k][c] for c in CODE_KEYS} for k in TEMPLATE_CODES if k in seg}
            out.append(Segment(value, name, tuple(rgb) if rgb else PALETTE[(value - 1) % len(PALETTE)], term,
                               seg.get("SegmentDescription")))
    return sorted(out, key=lambda s: s.value)


def inline_segments(names):
    """Segments of inline ``segment_names``: a name, or ``{name, number, label, code, scheme, category_number}``
    (label value ``number``, default its position + 1; shown as ``label``, default ``name``). A name without
    ``code`` is coded with the SNOMED CT concept it names, as established (``terminology``)."""
    from .terminology import coded_segment

    out = []
    for i, s in enumerate(names):
        if isinstance(s, str):
            s = {"name": s}
        value = s.get("number") or i + 1
        label, term = coded_segment(s["name"], s.get("label"), s.get("code"), s.get("scheme"),
                                    s.get("category_number"))
        out.append(Segment(value, label, PALETTE[(value - 1) % len(PALETTE)], term))
    return sorted(out, key=lambda s: s.value)


def _totalseg_installed():
    import importlib.util

    return importlib.util.find_spec("totalsegmentator") is not None


# TotalSegmentator task names of the established server that are single parts of TotalSegmentator's multi-part
# tasks (TotalSegmentator itself names tasks "total", "total_mr", ...; "_fast"/"_fastest" pick its sub-modes).
TOTALSEG_PART_TASKS = {
    "organ_ct": (291, "class_map_5_parts", "class_map_part_organs"),
    "vertebrae_ct": (292, "class_map_5_parts", "class_map_part_vertebrae"),
    "cardiac_ct": (293, "class_map_5_parts", "class_map_part_cardiac"),
    "muscle_ct": (294, "class_map_5_parts", "class_map_part_muscles"),
    "ribs_ct": (295, "class_map_5_parts", "class_map_part_ribs"),
    "organ_mr": (850, "class_map_parts_mr", "class_map_part_organs"),
    "muscles_mr": (851, "class_map_parts_mr", "class_map_part_muscles"),
    "headneck_muscles_1": (778, "class_map_parts_headneck_muscles", "class_map_part_muscles_1"),
    "headneck_muscles_2": (779, "class_map_parts_headneck_muscles", "class_map_part_muscles_2"),
}


def _split_task(task):
    for suffix in ("_fastest", "_fast"):
        if task.endswith(suffix):
            return task[:-len(suffix)], suffix[1:]
    return task, None


def totalseg_task_id(task):
    """The nnU-Net dataset id of a TotalSegmentator task (a number, a part name, or a task name with an optional
    ``_fast`` / ``_fastest`` sub-mode), from TotalSegmentator's own task table. ``ModelUnavailable`` for names it
    does not know and for multi-part tasks (name one of their parts)."""
    if isinstance(task, int) or (isinstance(task, str) and task.isdigit()):
        return int(task)
    if task in TOTALSEG_PART_TASKS:
        return TOTALSEG_PART_TASKS[task][0]
    try:
        from totalsegmentator.map_tasks_config import TASK_CONFIGS
    except ImportError:
        TASK_CONFIGS = {}
    base, mode = _split_task(task)
    if task in TASK_CONFIGS:
        cfg, mode = TASK_CONFIGS[task], "default"
    elif mode and base in TASK_CONFIGS:
        cfg = TASK_CONFIGS[base]
    else:
        raise ModelUnavailable("TotalSegmentator task %r is not one this TotalSegmentator knows (tasks: %s; or give "
                               "the task's number)" % (task, ", ".join(sorted(TASK_CONFIGS)[:40]) or "unknown"))
    if "sub_modes" in cfg:
        task_id = (cfg["sub_modes"].get(mode) or {}).get("task_id")
    else:
        task_id = cfg.get("task_id")
    if isinstance(task_id, (list, tuple)):
        parts = [k for k, v in TOTALSEG_PART_TASKS.items() if v[0] in task_id]
        raise ModelUnavailable("TotalSegmentator task %r has several parts (%s), which this server does not combine; "
                               "register one part per model%s" % (task, ", ".join(map(str, task_id)),
                                                                  " (%s)" % ", ".join(parts) if parts else ""))
    if not isinstance(task_id, int):
        raise ModelUnavailable("TotalSegmentator task %r has no task id in TotalSegmentator's table" % task)
    return task_id


def _totalseg_segments(task):
    """Segments from TotalSegmentator's class map (empty when it is not installed or has no map for the task)."""
    try:
        from totalsegmentator import map_to_binary as m
    except ImportError:
        return []
    mapping = None
    if isinstance(task, str):
        if task in TOTALSEG_PART_TASKS:
            _tid, group, part = TOTALSEG_PART_TASKS[task]
            mapping = getattr(m, group, {}).get(part)
        else:
            mapping = m.class_map.get(task) or m.class_map.get(_split_task(task)[0])
    if not mapping:
        return []
    return [Segment(int(v), str(n), PALETTE[(int(v) - 1) % len(PALETTE)]) for v, n in sorted(mapping.items())]
