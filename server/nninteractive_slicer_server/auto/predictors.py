"""nnU-Net's own ``nnUNetPredictor`` for registered models: a TTL cache of loaded predictors, the wait for free GPU
memory, and one prediction cut into pieces that take turns with the prompts on the prediction thread.

One prediction (``AutoSegmenter.predict``):

1. resolve the model (``Registry``), its arguments (``default_args`` overridden by the request) and its result folder;
2. get its predictor from the cache (loading it on the CPU on a miss: ``initialize_from_trained_model_folder``; a
   fold or checkpoint file that is not there is a 400 naming what is, a load that fails a 503 naming the model);
3. reserve its working memory from the server's ``MemoryBudget`` for the whole prediction (``LoadedPredictor.
   working_bytes``: the float copies, preprocessing, logits at the network's resolution, the export, probability
   maps): 413 when it can never fit, 503 + Retry-After when other work holds the budget now;
4. preprocess the array (nnU-Net's own preprocessor: crop, normalise, resample to the model's spacing), here;
5. wait for the model's ``min_mem`` MiB of free GPU memory (CUDA only; ``NotEnoughGPUMemory``, HTTP 503, when it
   gives up), outside the queue so that nobody waits behind the wait;
6. the sliding window (folds averaged, mirroring when ``tta``) and the export (logits to the image's grid, one class
   at a time) in pieces (``auto.pieces``) through ``queue``, the server's ``scheduler.DeviceQueue``: the same single
   thread every prompt runs on, prompts first, a tile or an export step at a time;
7. back here: a class subset's label values, probability thresholds.

``cancel`` (a ``cancel.CancelToken``) stops a prediction between two pieces; whatever it held (tensors, logits, the
reservation) is given back on the way out.

Arrays: ``image`` is ``[channels, *spatial]`` in the axis order nnU-Net's image reader gives for the model's files
(SimpleITK's for SimpleITKIO models, i.e. numpy ``[c, k, j, i]``, the order of Slicer's ``arrayFromVolume``), and
``spacing`` is in that same axis order. Labels come back with the image's spatial shape.

``class_idx``, ``proba_threshold`` and ``min_confidence`` behave as in the established nnU-Net server:

* ``class_idx`` (a label value or a list): the prediction is restricted to background + those classes (the
  softmax taken over them alone); only their labels appear;
* ``proba_threshold`` with ``class_idx``: the probability of those classes (summed) is cut below the threshold,
  split into connected components (26-connected), components of ``MIN_COMPONENT_VOXELS`` voxels or fewer and those
  whose highest probability is below ``min_confidence`` (default: the threshold) are dropped, and what remains
  above the threshold is labelled ``min(class_idx)``; the kept probabilities are the probability map;
* ``proba_threshold`` without ``class_idx``: labels are the argmax (as without a threshold), and the
  probabilities of every class come back.
"""

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..cancel import NEVER
from ..errors import Unavailable, is_out_of_memory
from ..scheduler import DeviceQueue
from ..validate import BadInput
from .pieces import SLAB_VOXELS, expected_pieces, export_steps, logits_steps
from .registry import ArgError, ModelUnavailable, check_args

log = logging.getLogger("nninteractive_slicer_server")

MiB = 1 << 20
MIN_COMPONENT_VOXELS = 10  # the established server drops probability components this small or smaller
DEFAULT_CHECKPOINT = "checkpoint_final.pth"


class NotEnoughGPUMemory(Unavailable):
    """The model's ``min_mem`` of GPU memory did not become free in time (HTTP 503 with Retry-After)."""


# ---------------------------------------------------------------------------------------------------------- memory

def cuda_free_memory(device):
    """``(free_bytes, total_bytes)`` of a CUDA device, as the driver reports it (other processes included)."""
    import torch

    return torch.cuda.mem_get_info(device)


def _release_cached(device):
    import torch

    torch.cuda.empty_cache()  # memory our own allocator keeps counts as used for mem_get_info


def wait_for_gpu_memory(min_mem_mib, device, timeout_s=120.0, probe=None, poll_s=0.5, sleep=time.sleep,
                        clock=time.monotonic, release=None, what="this model"):
    """Wait until ``device`` has ``min_mem_mib`` MiB free; return the free MiB seen (None when nothing was checked:
    no ``min_mem``, or not a CUDA device). ``probe(device) -> (free_bytes, total_bytes)`` defaults to
    ``torch.cuda.mem_get_info``; ``release(device)`` (default: empty torch's cache, when the probe is the default)
    runs once when memory is short. Raises ``NotEnoughGPUMemory`` after ``timeout_s``."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if not min_mem_mib or kind != "cuda":
        return None
    if probe is None:
        probe = cuda_free_memory
        release = release or _release_cached
    deadline = clock() + max(0.0, float(timeout_s))
    released = False
    while True:
        free, total = probe(device)
        free_mib, total_mib = free / MiB, total / MiB
        if free_mib >= min_mem_mib:
            return free_mib
        if release is not None and not released:
            released = True
            release(device)
            continue
        remaining = deadline - clock()
        if remaining <= 0:
            raise NotEnoughGPUMemory(
                "%s needs %d MiB of free GPU memory on %s; only %d of %d MiB were free after waiting %.0f s (other "
                "work on the GPU holds the rest); try again later" % (what, min_mem_mib, device, free_mib, total_mib,
                                                                       timeout_s), retry_after=max(1, poll_s * 10))
        sleep(min(poll_s, remaining))


# ---------------------------------------------------------------------------------------------------------- predictors

class LoadedPredictor:
    """One ``nnUNetPredictor`` with its model folder, folds and checkpoint: preprocessing (here), and the pieces of a
    prediction for the device queue (``steps``; see ``auto.pieces``)."""

    def __init__(self, folder, use_folds, checkpoint_name, device):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.folder, self.use_folds, self.checkpoint_name = folder, tuple(use_folds), checkpoint_name
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        started = time.perf_counter()
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                         perform_everything_on_device=on_cuda, device=self.device, verbose=False,
                                         verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(folder, use_folds=self.use_folds,
                                                            checkpoint_name=checkpoint_name)
        self.load_seconds = time.perf_counter() - started
        self.label_manager = self.predictor.label_manager
        self.num_channels = len(self.predictor.dataset_json["channel_names"])
        self.label_values = [int(v) for v in self.label_manager.foreground_labels] if not \
            self.label_manager.has_regions else [int(v) for v in self.label_manager.regions_class_order]
        self.has_regions = bool(self.label_manager.has_regions)
        self._loaded_params = None  # the fold whose parameters the network holds (pieces of runs interleave)
        log.info("auto: loaded %s (folds %s, %s) on %s in %.1f s", folder, list(self.use_folds), checkpoint_name,
                 self.device, self.load_seconds)

    def preprocess(self, image, spacing):
        import torch

        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        pre = cm.preprocessor_class(verbose=False)
        data, _seg, props = pre.run_case_npy(np.asarray(image, dtype=np.float32), None,
                                             {"spacing": [float(s) for s in spacing]}, pm, cm,
                                             self.predictor.dataset_json)
        return torch.from_numpy(data), props

    def load_parameters(self, params):
        """Put one fold's parameters into the network, unless it holds them already (on the prediction thread)."""
        if self._loaded_params is params:
            return
        network = self.predictor.network
        getattr(network, "_orig_mod", network).load_state_dict(params)  # a torch.compile'd network wraps the module
        self._loaded_params = params

    def steps(self, data, props, tta=False, class_idx=None, probabilities=False):
        """``(steps, pieces)``: ``steps(run)`` for ``DeviceQueue.run_pieces`` (the logits of preprocessed ``data``,
        then the export to the image's grid) and how many pieces it takes. Its value: ``(labels, probabilities or
        None)``; with ``class_idx`` (non-region models) the softmax is over background + those classes only, the
        probabilities have one channel per entry of ``[0] + class_idx``, and the labels are the classes' own
        values."""
        lm, channels, mapping = self.label_manager, None, None
        if class_idx and not self.has_regions and sorted(class_idx) != sorted(self.label_values):
            from nnunetv2.utilities.label_handling.label_handling import LabelManager

            channels = [0] + list(class_idx)
            lm = LabelManager({"background": 0, **{"c%d" % v: i + 1 for i, v in enumerate(class_idx)}},
                              regions_class_order=None)
            mapping = np.array(channels, dtype=np.uint16 if max(channels) > 255 else np.uint8)

        def run_steps(run):
            logits = yield from logits_steps(self, data, run, tta)
            out = yield from export_steps(self.predictor, logits, props, run, lm, channels, probabilities)
            del logits
            seg, probs = out if probabilities else (out, None)
            if mapping is not None:
                seg = mapping[seg]
            elif class_idx and self.has_regions:
                seg = np.where(np.isin(seg, class_idx), seg, 0).astype(seg.dtype)
            return seg, probs

        heads = len(channels) if channels else int(self.label_manager.num_segmentation_heads)
        return run_steps, expected_pieces(self.predictor, data.shape, props, heads, probabilities)

    def working_bytes(self, image_shape, spacing, probabilities=False):
        """The memory one prediction of an image ``[channels, *spatial]`` of ``spacing`` needs at its peak, beside
        the image itself (an estimate from nnU-Net's steps, on the large side): the largest of preprocessing (two
        float32 copies, float64 while resampling), the sliding window (the padded input, half-precision logits of
        every head and their fold sum at the network's resolution) and the export (those logits, one class resampled
        in float64, the running argmax, the labels; with ``probabilities`` the map, classes x voxels float32)."""
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        channels, spatial = int(image_shape[0]), [int(s) for s in image_shape[1:]]
        voxels = int(np.prod(spatial))
        shape_t = [spatial[i] for i in pm.transpose_forward]
        spacing_t = [float(spacing[i]) for i in pm.transpose_forward]
        target = cm.spacing if len(cm.spacing) == len(shape_t) else [spacing_t[0], *cm.spacing]
        net = [int(n) for n in compute_new_shape(shape_t, spacing_t, target)]
        net_voxels = int(np.prod(net))
        patch = list(cm.patch_size)
        padded = net[:len(net) - len(patch)] + [max(n, p) for n, p in zip(net[len(net) - len(patch):], patch)]
        padded_voxels = int(np.prod(padded))
        heads = int(self.label_manager.num_segmentation_heads)
        folds = len(self.predictor.list_of_parameters)
        resampled = net != shape_t
        preprocess = channels * voxels * (4 + 4 + (8 if resampled else 0)) + channels * net_voxels * 4
        window = channels * (net_voxels + padded_voxels) * 4 + heads * padded_voxels * 2 * (2 if folds > 1 else 1) \
            + padded_voxels * 2
        export = heads * net_voxels * 2 + net_voxels * 8 + voxels * (8 + 2 + 2 + 1 + 2 + 2)
        if probabilities:
            export += heads * voxels * 4 + voxels * 8 + 2 * heads * SLAB_VOXELS * 4
        return int(max(preprocess, window, export) + voxels * 2)  # + the labels handed back


_NO_DIRS = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)+")  # the folders of an absolute path in a message


class ModelLoadFailed(ModelUnavailable):
    """A registered model's files are there but nnU-Net could not load them (HTTP 503 naming the model); remembered
    for ``PredictorCache.FAILED_RETRY_S`` so that requests do not reload a broken checkpoint one after another."""


def check_model_files(folder, use_folds, checkpoint_name, model="this model"):
    """``BadInput`` (400) unless every fold asked for has a ``fold_<f>`` folder holding ``checkpoint_name``: the
    message names the missing file and what exists (no server path)."""
    try:
        present = sorted(d for d in os.listdir(folder) if d.startswith("fold_") and
                         os.path.isdir(os.path.join(folder, d)))
    except OSError as exc:
        raise ModelUnavailable("model %r: its result folder cannot be read (%s)" % (model, exc.strerror or exc))
    for fold in use_folds:
        sub = "fold_%s" % fold
        if sub not in present:
            raise BadInput("use_folds: model %r has no fold %s (its folds: %s)"
                           % (model, fold, ", ".join(d[5:] for d in present) or "none"))
        if not os.path.isfile(os.path.join(folder, sub, checkpoint_name)):
            try:
                there = sorted(f for f in os.listdir(os.path.join(folder, sub)) if f.endswith(".pth"))
            except OSError:
                there = []
            raise BadInput("checkpoint_name: model %r has no %s in %s (there: %s)"
                           % (model, checkpoint_name, sub, ", ".join(there) or "no checkpoint"))


class PredictorCache:
    """Loaded predictors by (result folder, folds, checkpoint): at most ``max_size``, each dropped ``ttl_s``
    seconds after its last use (``sweep``; every ``get`` sweeps too); ``expire()`` empties it. Loading happens
    outside the cache's lock (one load per key at a time), so a slow load never blocks hits on other models.

    A failed load leaves nothing behind but one bounded record (``failures``: at most ``MAX_FAILED``, the oldest
    dropped first): the key's loading lock goes with its last waiter, and for ``FAILED_RETRY_S`` the same key fails
    at once with the same ``ModelLoadFailed`` instead of loading again (``expire()`` forgets failures too: an
    operator who fixed the files need not wait). Files that are not there never reach the loader (400)."""

    MAX_FAILED = 32
    FAILED_RETRY_S = 60.0

    def __init__(self, device="cpu", max_size=2, ttl_s=600.0, loader=None, clock=time.monotonic):
        if max_size < 1:
            raise ValueError("the predictor cache needs room for at least one predictor")
        self.device, self.max_size, self.ttl_s = str(device), int(max_size), float(ttl_s)
        self._loader = loader or (lambda folder, folds, ckpt: LoadedPredictor(folder, folds, ckpt, self.device))
        self._clock = clock
        self._entries = OrderedDict()  # key -> [predictor, last_used]
        self._lock = threading.Lock()
        self._loading = {}  # key -> [Lock, requests holding or waiting for it]; empty when nothing loads
        self._failed = OrderedDict()  # key -> (ModelLoadFailed, when, model)
        self.hits = self.misses = self.evictions = self.load_failures = 0

    @staticmethod
    def key(folder, use_folds, checkpoint_name):
        return (os.path.realpath(folder), tuple(str(f) for f in use_folds), checkpoint_name)

    def get(self, folder, use_folds=(0,), checkpoint_name=DEFAULT_CHECKPOINT, model=None):
        """The predictor of ``folder`` (a registered model's result folder; ``model`` its id, for messages) with
        these folds and checkpoint, loaded on a miss. ``BadInput`` when a fold or the checkpoint file is not there,
        ``ModelLoadFailed`` when nnU-Net cannot load them."""
        key = self.key(folder, use_folds, checkpoint_name)
        name = model or os.path.basename(key[0])
        self.sweep()
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
        check_model_files(folder, key[1], checkpoint_name, name)  # before any lock or record exists for the key
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            slot = self._loading.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                with self._lock:
                    hit = self._hit(key)  # loaded (or failed) by another request meanwhile
                    if hit is not None:
                        return hit
                loaded = self._load(key, folder, name)
                with self._lock:
                    self.misses += 1
                    self._entries[key] = [loaded, self._clock()]
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.max_size:
                        self._entries.popitem(last=False)
                        self.evictions += 1
                return loaded
        finally:
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._loading[key]

    def _hit(self, key):
        """Under the lock: the loaded predictor, or raise the key's recent failure, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            entry[1] = self._clock()
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        failed = self._failed.get(key)
        if failed is not None:
            if self._clock() - failed[1] < self.FAILED_RETRY_S:
                raise failed[0]
            del self._failed[key]
        return None

    def _load(self, key, folder, name):
        try:
            return self._loader(folder, [_fold(f) for f in key[1]], key[2])
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # the device's state, not the model's: nothing to remember (the caller answers 507)
            log.error("auto: model %r (%s, folds %s, %s) cannot be loaded", name, folder, list(key[1]), key[2],
                      exc_info=True)
            text = _NO_DIRS.sub("", str(exc))[:300]  # file names, not the server's paths
            failure = ModelLoadFailed("model %r cannot be loaded on this server (folds %s, %s: %s: %s); its files "
                                      "need the operator's attention (the server log has the details), or choose "
                                      "other folds or another checkpoint_name"
                                      % (name, ", ".join(key[1]), key[2], type(exc).__name__, text))
            with self._lock:
                self.load_failures += 1
                self._failed[key] = (failure, self._clock(), name)
                self._failed.move_to_end(key)
                while len(self._failed) > self.MAX_FAILED:
                    self._failed.popitem(last=False)
            raise failure from exc

    def failures(self):
        """``{(folder, folds, checkpoint): (model, message)}`` of the loads that failed recently."""
        now = self._clock()
        with self._lock:
            return {k: (f[2], f[0].detail) for k, f in self._failed.items() if now - f[1] < self.FAILED_RETRY_S}

    def sweep(self):
        """Drop predictors unused for ``ttl_s``; returns how many."""
        now = self._clock()
        with self._lock:
            old = [k for k, (_p, used) in self._entries.items() if now - used >= self.ttl_s]
            for k in old:
                del self._entries[k]
            self.evictions += len(old)
        if old:
            self._free_device()
        return len(old)

    def expire(self):
        """Drop every predictor (``/expire``) and forget failed loads; returns how many predictors there were."""
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self._failed.clear()
        if n:
            self._free_device()
        return n

    def _free_device(self):
        if self.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def stats(self):
        with self._lock:
            return {"size": len(self._entries), "max_size": self.max_size, "ttl_s": self.ttl_s, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions, "loading": len(self._loading),
                    "load_failures": self.load_failures, "failed_remembered": len(self._failed),
                    "loaded": [{"folder": os.path.basename(k[0]), "use_folds": list(k[1]), "checkpoint_name": k[2]}
                               for k in self._entries]}


def _fold(f):
    return f if f == "all" else int(f)


# ---------------------------------------------------------------------------------------------------------- results

@dataclass
class AutoResult:
    """One automatic segmentation. ``labels``: the label map (image's spatial shape, uint8 or uint16);
    ``probabilities``: ``[channels, *spatial]`` float32 when asked for or when a threshold was applied (with a
    class subset: the kept probability of those classes, one channel), else None; ``segments``: the registry's
    ``Segment`` records of the values that can appear; ``timings``: seconds for ``load`` (0 on a cache hit),
    ``preprocess``, ``memory_wait``, ``queue`` (its pieces waiting for prompts and other runs), ``predict`` (the
    sliding window's pieces), ``postprocess`` (the export's pieces and what follows) and ``longest_piece``."""

    model_id: str
    labels: np.ndarray
    segments: List[Any]
    probabilities: Optional[np.ndarray] = None
    args: Dict[str, Any] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    empty: bool = False


class AutoSegmenter:
    """Run registered models on arrays. ``queue``: where the pieces of a prediction run (the server passes its
    ``scheduler.DeviceQueue``, shared with the prompts; default: one of its own). ``budget``: the server's
    ``limits.MemoryBudget``, from which each prediction reserves its working memory (None: nothing reserved, as
    in the command-line tools). ``mem_probe`` is ``probe`` of ``wait_for_gpu_memory`` (injectable for tests)."""

    def __init__(self, registry, device="cpu", cache=None, queue=None, budget=None, cache_size=2, ttl_s=600.0,
                 mem_timeout_s=120.0, mem_probe=None, mem_poll_s=0.5, sleep=time.sleep):
        self.registry = registry
        self.device = str(device)
        self.cache = cache or PredictorCache(self.device, cache_size, ttl_s)
        self.queue = queue if queue is not None else DeviceQueue(name="nnunet-predict")
        self.budget = budget
        self.mem_timeout_s, self.mem_probe, self.mem_poll_s, self._sleep = mem_timeout_s, mem_probe, mem_poll_s, sleep

    def arguments(self, model, given=None):
        """The prediction arguments of ``model``: its ``default_args`` overridden by ``given`` (the fields a
        request set), normalised: ``use_folds`` a list, ``class_idx`` a list or None, one value (the first of a
        per-stage list) for the rest. ``BadInput`` for a wrong type."""
        spec = self.registry.get(model)
        args = self.registry.merged_args(spec, given)
        try:
            check_args(args)
        except ArgError as exc:
            raise BadInput(str(exc))
        folds = args.get("use_folds")
        folds = [0] if folds is None else [_fold(f) for f in (folds if isinstance(folds, (list, tuple)) else [folds])]
        ckpt = _first(args.get("checkpoint_name")) or DEFAULT_CHECKPOINT
        idx = _first(args.get("class_idx")) if _is_stage_list(args.get("class_idx")) else args.get("class_idx")
        if isinstance(idx, int):
            idx = [idx]
        out = dict(args, use_folds=folds, checkpoint_name=ckpt, class_idx=list(idx) if idx else None,
                   tta=bool(_first(args.get("tta"))), proba_threshold=_first(args.get("proba_threshold")),
                   min_confidence=_first(args.get("min_confidence")),
                   save_proba_map=bool(_first(args.get("save_proba_map"))))
        return out

    def predictor(self, model, given=None):
        """The loaded predictor (from the cache) for ``model`` with these arguments, and the arguments."""
        spec = self.registry.get(model)
        args = self.arguments(spec, given)
        folder = self.registry.result_folder(spec)
        return self.cache.get(folder, args["use_folds"], args["checkpoint_name"], model=spec.id), args

    def predict(self, model, image, spacing, probabilities=None, cancel=None, owner=None, user=None, **given):
        """Segment ``image`` (``[channels, *spatial]``) of voxel ``spacing`` with ``model`` (id, alias or name).
        ``given``: request fields overriding the model's defaults (``use_folds``, ``tta``, ``checkpoint_name``,
        ``class_idx``, ``proba_threshold``, ``min_confidence``, ``save_proba_map``). ``probabilities``: return
        the probability map (default: when ``save_proba_map`` or a threshold asks for it). ``cancel``: a
        ``CancelToken`` that stops it between pieces (``RunCancelled``); ``owner``: who it runs for, in the queue's
        positions (the lease of /x/auto_segment); ``user``: whose share of the memory budget its working memory
        takes."""
        cancel = cancel or NEVER
        spec = self.registry.get(model)
        timings = {}
        t0 = time.perf_counter()
        misses = self.cache.misses
        loaded, args = self.predictor(spec, given)
        timings["load"] = time.perf_counter() - t0 if self.cache.misses != misses else 0.0
        image = np.asarray(image)
        spacing = [float(s) for s in spacing]
        if image.ndim != len(spacing) + 1:
            raise BadInput("the image must be [channels, *spatial] with one spacing per spatial axis; got shape %s "
                           "and spacing %s" % (list(image.shape), spacing))
        if image.shape[0] != loaded.num_channels:
            raise BadInput("model %r expects %d image channel(s) (%s); the image has %d" % (
                spec.id, loaded.num_channels, ", ".join(loaded.predictor.dataset_json["channel_names"].values()),
                image.shape[0]))
        if not all(s > 0 for s in spacing):
            raise BadInput("the spacing %s must be positive" % spacing)
        idx = args["class_idx"]
        if idx:
            unknown = sorted(set(idx) - set(loaded.label_values))
            if unknown:
                raise BadInput("class_idx %s: model %r has no such label (its labels: %s)"
                               % (unknown, spec.id, loaded.label_values))
        threshold = args["proba_threshold"]
        want_probs = bool(probabilities if probabilities is not None else (args["save_proba_map"] or
                                                                          threshold is not None))
        need_probs = want_probs or threshold is not None
        reserved = self.reserve(loaded.working_bytes(image.shape, spacing, need_probs),
                                "the automatic segmentation of the image %s with model %r"
                                % (list(image.shape), spec.id), user=user)
        data = props = steps = None
        try:
            cancel.check()
            t = time.perf_counter()
            data, props = loaded.preprocess(image, spacing)
            timings["preprocess"] = time.perf_counter() - t
            cancel.check()
            t = time.perf_counter()
            wait_for_gpu_memory(spec.min_mem, loaded.device, self.mem_timeout_s, probe=self.mem_probe,
                                poll_s=self.mem_poll_s, sleep=self._sleep, what="model %r" % spec.id)
            timings["memory_wait"] = time.perf_counter() - t
            steps, pieces = loaded.steps(data, props, args["tta"], idx, need_probs)
            (seg, probs), run = self.queue.run_pieces(steps, owner=owner, cancel=cancel, what="model %r" % spec.id,
                                                      expected=pieces)
            data = None
            timings["queue"] = run.waited  # ready but waiting: for prompts, and for other runs' pieces
            timings["predict"] = run.ran.get("predict", 0.0)
            timings["longest_piece"] = run.longest  # the most a prompt waited for this run
            t = time.perf_counter()
            if threshold is not None and idx:
                # probs channels: [background, *idx] (non-region subset) or every region / class
                chans = list(range(1, len(idx) + 1)) if not loaded.has_regions and len(probs) == len(idx) + 1 else \
                    [_channel(loaded, v) for v in idx]
                p = probs[chans].sum(0) if len(chans) > 1 else probs[chans[0]]
                kept = threshold_components(np.asarray(p, dtype=np.float32), threshold, args["min_confidence"])
                dtype = np.uint16 if min(idx) > 255 else np.uint8
                seg = np.where(kept > threshold, min(idx), 0).astype(dtype)
                probs = kept[None] if want_probs else None
            elif not want_probs:
                probs = None
            timings["postprocess"] = run.ran.get("export", 0.0) + time.perf_counter() - t
        finally:
            data = props = steps = None  # a failed or cancelled run lets go of its arrays before its reservation
            if reserved is not None:
                reserved.release()
        values = [v for v in (idx if idx else loaded.label_values)]
        if threshold is not None and idx:
            values = [min(idx)]
        by_value = {s.value: s for s in self.registry.segments(spec)}
        segments = [by_value[v] for v in values if v in by_value]
        seg = np.ascontiguousarray(seg)
        return AutoResult(model_id=spec.id, labels=seg, segments=segments, probabilities=probs, args=args,
                          timings=timings, empty=not bool(seg.any()))

    def reserve(self, nbytes, what, user=None):
        """The one place a prediction takes its working memory from the server's budget (None without one), against
        ``user``'s share of it."""
        if self.budget is None:
            return None
        return self.budget.reserve(nbytes, what, user=user)


def threshold_components(p, threshold, min_confidence=None, min_voxels=MIN_COMPONENT_VOXELS):
    """The established candidate extraction: ``p`` cut below ``threshold``, then 26-connected components kept when
    larger than ``min_voxels`` voxels and reaching ``min_confidence`` (default ``threshold``) somewhere. Returns
    the kept probabilities (0 elsewhere)."""
    from scipy import ndimage

    clipped = np.where(p < threshold, 0.0, p).astype(np.float32)
    comps, n = ndimage.label(clipped > 0, structure=np.ones((3,) * p.ndim))
    if n == 0:
        return clipped
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(clipped), comps, index)
    peaks = ndimage.maximum(clipped, comps, index)
    floor = threshold if min_confidence is None else min_confidence
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (sizes > min_voxels) & (np.asarray(peaks) >= floor)
    return np.where(keep[comps], clipped, 0.0).astype(np.float32)


def _channel(loaded, value):
    if loaded.has_regions:
        return loaded.label_values.index(value)
    return int(value)


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) and v else (None if isinstance(v, (list, tuple)) else v)


def _is_stage_list(v):
    """A per-stage list (``[[1, 2], None]``, ``[None]``) rather than a list of labels (``[1, 2]``)."""
    return isinstance(v, (list, tuple)) and any(x is None or isinstance(x, (list, tuple)) for x in v)
