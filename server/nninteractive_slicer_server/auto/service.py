"""What the automatic-model endpoints share (``request.app.state.server.auto``): the registry, the segmenter (its
predictor cache), the allowed directories, the jobs of uploads, readiness, and the one place where ``/infer`` meets
the study reader and writer (``run_study``).
"""

import logging
import os

from . import pipeline
from .jobs import JobStore, PathGuard
from .registry import ModelUnavailable, dataset_labels

log = logging.getLogger("nninteractive_slicer_server")

MiB = 1 << 20
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt")
MAX_LICENSE_CHARS = 20000


# ---------------------------------------------------------------------------------------------------------- run_study
# THE ONE PLACE where the endpoints meet issue 11's study IO: ``AutoService.run_study(fields, resolve_path)`` calls
# ``pipeline.run_study`` (NIfTI/DICOM in; prediction.nii.gz, DICOM SEG, RTSTRUCT out; cascades; outputs in
# ``output_dir/stage_<i>/``):
#
# * called in a worker thread, at most Limits.max_running_jobs at once (routes.auto); forward passes go through
#   ``segmenter`` (AutoSegmenter, its queue = Engine.queue: in pieces between the prompts on the prediction thread,
#   its working memory reserved from the server's MemoryBudget);
# * ``fields``: the fields the client set (auto/request.py, JSON values; unset fields are absent so that the models'
#   default_args fill them). For /infer_file ``study_path`` is the unpacked archive and ``output_dir`` the job's
#   output folder (zipped for /download afterwards);
# * ``resolve_path(path, field)``: every path the pipeline reads or writes goes through it (study, series folders and
#   the DICOM files in them, output folder, masks, tmp_dir): ``PathGuard.resolver`` confines them to the
#   --infer-root folders (/infer) or to the job's folder (/infer_file), after resolving '..' and links (403);
# * errors: ``validate.BadInput`` (400) or an ``errors.Problem`` (its status); anything else is a 500 that says only
#   "internal error" and a request id (the log has the traceback).


# ---------------------------------------------------------------------------------------------------------- service

class AutoService:
    def __init__(self, registry, segmenter, limits, infer_roots=(), jobs_dir=None):
        self.registry = registry
        self.segmenter = segmenter
        self.limits = limits
        self.guard = PathGuard(infer_roots)
        self.jobs = JobStore(jobs_dir, limits)
        self.running = None  # asyncio.Semaphore(limits.max_running_jobs), made on the event loop (routes.auto)

    def describe(self):
        return ("%d automatic model(s) from %s (%s); /infer on paths %s; %s"
                % (len(self.registry), self.registry.path, ", ".join(self.registry.ids()),
                   "under " + ", ".join(self.guard.roots) if self.guard else "off (no --infer-root)",
                   self.limits.describe_jobs()))

    def run_study(self, fields, resolve_path, cancel=None, progress=None):
        """One study (see the notes above ``AutoService``): the established response. ``cancel`` (a
        ``cancel.CancelToken``) stops it between stages and between the pieces of each prediction
        (``RunCancelled``, 409), giving back what it holds; ``progress(message)`` hears what happens."""
        return pipeline.run_study(self.registry, self.segmenter, fields, resolve_path=resolve_path, progress=progress,
                                  cancel=cancel)

    def sweep(self):
        """The reaper's round: predictors unused for their TTL, jobs past theirs."""
        self.segmenter.cache.sweep()
        self.jobs.expire()

    def close(self):
        self.segmenter.cache.expire()
        self.jobs.close()

    # ------------------------------------------------------------------ what clients see

    def model_info(self):
        """``{id: description}`` of every registered model: names, aliases, labels (names, colours, terminology),
        default arguments, metadata, channels, license. No server path. TotalSegmentator entries are not downloaded
        for this: their labels come from TotalSegmentator's class map when it is installed."""
        out = {}
        for mid in self.registry.ids():
            spec = self.registry.get(mid)
            local = spec.totalseg_task is None or spec.rel_path is not None
            info = self.registry.describe(spec, resolve=local)
            if local:
                try:
                    folder = self.registry.result_folder(spec)
                    info.update(_folder_info(folder))
                    info["available"] = True
                except (ModelUnavailable, ValueError, OSError) as exc:
                    info["available"], info["unavailable_reason"] = False, str(getattr(exc, "detail", exc))
            out[mid] = info
        return out

    def readiness(self):
        """``(ready, body)``: the registry loaded and the device usable."""
        import torch

        device = torch.device(self.segmenter.device)
        usable, gpu, free_mib, why = True, False, None, None
        if device.type == "cuda":
            try:
                free, _total = torch.cuda.mem_get_info(device)
                gpu, free_mib = True, round(free / MiB)
            except Exception as exc:  # driver gone, device lost
                usable, why = False, "the CUDA device %s cannot be used (%s)" % (device, exc)
        elif device.type == "mps":
            gpu = usable = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
            why = None if usable else "the MPS device is not available"
        loaded = len(self.registry) > 0
        ready = loaded and usable
        body = {"status": "ok" if ready else "unavailable", "models_loaded": loaded, "models": len(self.registry),
                "device": str(device), "device_usable": usable, "gpu_available": gpu, "max_free_mem": free_mib,
                "predictor_cache": self.segmenter.cache.stats(), "jobs": len(self.jobs),
                "infer_on_paths": bool(self.guard)}
        if why:
            body["detail"] = why
        return ready, body


def _folder_info(folder):
    """Channels, labels and license of a result folder (the established ``model_information`` / ``n_classes``)."""
    import json

    info = {}
    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
            ds = json.load(f)
        labels = dataset_labels(folder)
        info["model_information"] = {"channel_names": ds.get("channel_names", {}), "labels": labels}
        info["n_classes"] = len(labels) + 1
    except (OSError, ValueError):
        pass
    for name in LICENSE_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    info["license"] = f.read(MAX_LICENSE_CHARS).strip()
            except OSError:
                pass
            break
    return info
