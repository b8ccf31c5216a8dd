"""What the automatic-model endpoints share (``request.app.state.server.auto``): the registry, the segmenter (its
predictor cache), the allowed directories, the jobs of uploads, readiness, and the one place where ``/infer`` meets
the study reader and writer (``run_study``).
"""

import json
import logging
import os
import uuid

from ..cancel import NEVER
from ..validate import BadInput
from . import pipeline
from .jobs import PATHS, UPLOAD, Job, JobStore, archive_kind, unpack_archive
from .paths import PathGuard, folder_files
from .registry import ModelUnavailable, dataset_labels
from .runner import JobRunner

log = logging.getLogger("nninteractive_slicer_server")

MiB = 1 << 20
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt")
MAX_LICENSE_CHARS = 20000


# ---------------------------------------------------------------------------------------------------------- run_study
# THE ONE PLACE where the endpoints meet issue 11's study IO: ``AutoService.run_study(fields, files, cancel,
# progress)`` calls ``pipeline.run_study`` (NIfTI/DICOM in; prediction.nii.gz, DICOM SEG, RTSTRUCT out; cascades;
# outputs in ``output_dir/stage_<i>/``):
#
# * called on a runner thread (auto/runner.py: at most Limits.max_running_jobs at once); forward passes go through
#   ``segmenter`` (AutoSegmenter, its queue = Engine.queue: in pieces between the prompts on the prediction thread,
#   its working memory reserved from the server's MemoryBudget);
# * ``fields``: the fields the client set (auto/request.py, JSON values; unset fields are absent so that the models'
#   default_args fill them). For an upload ``study_path`` is the unpacked archive and ``output_dir`` the job's
#   output folder (zipped for /download afterwards);
# * ``cancel`` (the job's CancelToken) and ``progress(message)``: the run stops between its pieces once cancelled
#   (DELETE /jobs/{id}, a synchronous client gone, the shutdown's deadline) and tells its steps to GET /jobs/{id};
# * ``files`` (auto/paths.py): every path the pipeline reads or writes goes through it (study, series folders and
#   the DICOM files in them, output folder, masks, tmp_dir): ``PathGuard.files`` confines them to the caller's
#   --infer-root folders (/infer) or to the job's folder (/infer_file), never through a link (403); inputs are read
#   from private copies under the jobs folder's .spool, outputs moved into place through held descriptors;
# * limits: every input's header is checked against ``limits`` (--max-image-voxels) and its reading reserved from
#   ``budget`` (the server's MemoryBudget, shared with the sessions) before any pixel is read (auto/inputs.py);
# * errors: ``validate.BadInput`` (400) or an ``errors.Problem`` (its status); anything else is a 500 that says only
#   "internal error" and a request id (the log has the traceback).


# ---------------------------------------------------------------------------------------------------------- service

class AutoService:
    orthanc = None  # auto.orthanc.Orthanc: the operator's Orthanc for /infer_orthanc (--orthanc-url), or None

    def __init__(self, registry, segmenter, limits, infer_roots=(), jobs_dir=None, budget=None):
        self.registry = registry
        self.segmenter = segmenter
        self.limits = limits
        self.budget = budget  # limits.MemoryBudget: the server's (app.Server sets it when None)
        self.guard = PathGuard(infer_roots)
        self.jobs = JobStore(jobs_dir, limits)
        self.runner = JobRunner(self.jobs, limits.max_running_jobs)

    def describe(self):
        return ("%d automatic model(s) from %s (%s); /infer on paths %s; %d run(s) at once; %s"
                % (len(self.registry), self.registry.path, ", ".join(self.registry.ids()),
                   "under " + ", ".join(self.guard.roots) if self.guard else "off (no --infer-root)",
                   self.runner.workers, self.limits.describe_jobs()))

    def run_study(self, fields, files, cancel=None, progress=None, job=None):
        """One study (see the notes above ``AutoService``): the established response. ``cancel`` (a
        ``cancel.CancelToken``) stops it between stages and between the pieces of each prediction (``RunCancelled``,
        409), giving back what it holds; ``progress(message)`` hears its steps. Logged with its user, what
        it reads and what it wrote (``job``: the job it runs for)."""
        (cancel or NEVER).check()
        run = job.id[:8] if job is not None else "-"
        named = {k: fields.get(k) for k in ("study_path", "series_folders", "crop_from", "intersect_with")
                 if fields.get(k) is not None}
        log.info("auto: run %s of user %s reads %s and writes into %s", run, json.dumps(files.user),
                 json.dumps(named), json.dumps(fields.get("output_dir")))
        result = pipeline.run_study(self.registry, self.segmenter, fields, files=files, progress=progress,
                                    limits=self.limits, budget=self.budget, cancel=cancel)
        written = [p for key in pipeline.OUTPUT_KEYS for p in result.get(key) or [] if p]
        log.info("auto: run %s of user %s wrote %s", run, json.dumps(files.user), json.dumps(written))
        return result

    def _files(self, user, **kw):
        """What a run of ``user`` may touch: the --infer-root folders (``folder``: a folder of the server's own first),
        private copies under the jobs folder, copies bounded by --max-unpacked-bytes."""
        return self.guard.files(user, scratch=self.jobs.spool, limit=self.limits.max_unpacked_bytes, **kw)

    def check_models(self, nnunet_id):
        """Every model a request names is registered (``UnknownModel``: 400 naming the known ids) and can serve
        (``ModelUnavailable``: 503 naming the model and why)."""
        for name in nnunet_id if isinstance(nnunet_id, list) else [nnunet_id]:
            spec = self.registry.get(name)
            reason = self.registry.unavailable_reason(spec)
            if reason:
                raise ModelUnavailable("model %r is unavailable on this server: %s; the other models work (GET "
                                       "/model_info says which)" % (spec.id, reason))

    # ------------------------------------------------------------------ jobs

    def submit_paths(self, user, fields, sync):
        """A study on server paths (``fields`` parsed, models checked): its paths and arguments are checked now (400,
        403: before it waits for its turn, and before any job exists), then a job is queued for the runner (the run
        checks them again). ``sync`` (the established /infer) is never stored: its client waits on ``job.future``."""
        ids = fields["nnunet_id"] if isinstance(fields["nnunet_id"], list) else [fields["nnunet_id"]]
        if not any(self.registry.get(i).totalseg_task is not None and self.registry.get(i).rel_path is None
                   for i in ids):  # a TotalSegmentator model may download its weights first: that is the run's work
            with self.guard.files(user) as files:
                pipeline.plan_request(self.registry, self.segmenter, fields, files)
        if sync:
            job = Job(uuid.uuid4().hex, user, PATHS, request=fields, created=self.jobs.clock())
        else:
            job = self.jobs.create(user, PATHS, fields)
        job.fields, job.sync = fields, sync
        return self._submit(job, self._run_paths)

    def submit_upload(self, user, upload, fields, sync):
        """An uploaded study (``upload`` received, ``fields`` checked, models checked): the archive must be one, then
        a job takes the upload over and is queued for the runner. ``sync``: the established /infer_file (a failure
        leaves nothing behind)."""
        if archive_kind(upload.path) is None:
            raise BadInput("the uploaded file is not a zip or tar archive (tar.gz, tgz, tar.bz2 and tar.xz work too)")
        request = {k: v for k, v in fields.items() if k not in ("study_path", "output_dir")}
        job = self.jobs.create(user, UPLOAD, request, upload.receipt, upload.path)
        # The study is the archive, the outputs go to the job's folder; tmp_dir is ignored (nothing is written
        # elsewhere); relative masks (crop_from, intersect_with) are paths inside the archive.
        job.fields = {k: v for k, v in fields.items() if k != "tmp_dir"}
        job.sync = sync
        return self._submit(job, self._run_upload)

    def submit_orthanc(self, user, fields, orthanc, stages, wanted):
        """A study of the operator's Orthanc (``/infer_orthanc``: ``fields`` parsed, models checked, ``wanted`` the
        series ids to fetch, ``stages`` the ``series_ids`` per stage): a synchronous job whose run fetches the series
        into its folder (within the run limit, off the request threads), runs them and stores the DICOM SEGs back.
        Its folder is removed once its answer is made (``jobs.discard``), as the established server does."""
        job = self.jobs.create(user, UPLOAD, {k: v for k, v in fields.items() if k != "tmp_dir"})
        job.fields, job.sync = fields, True
        return self._submit(job, lambda job: self._run_orthanc(job, orthanc, stages, wanted))

    def _run_orthanc(self, job, orthanc, stages, wanted):
        from .references import is_reference

        os.makedirs(job.inputs)
        os.makedirs(job.output)
        local = {}
        for k, sid in enumerate(wanted):
            job.token.check()
            job.say("fetching series %d of %d from Orthanc" % (k + 1, len(wanted)))
            folder = orthanc.download_series(sid, os.path.join(job.inputs, sid), self.limits)
            local[sid] = os.path.relpath(folder, job.inputs)
        run = {k: v for k, v in job.fields.items() if k not in ("series_ids", "tmp_dir")}
        run.update(study_path=job.inputs, output_dir=job.output, is_dicom=True,
                   series_folders=[[s if is_reference(s) else local[s] for s in stage] for stage in stages])
        # Masks (crop_from, intersect_with) are server paths, confined to --infer-root as for /infer.
        with self._files(job.user, base=job.inputs, folder=job.folder,
                         allowed="this run's folder or the --infer-root directories") as files:
            result = self.run_study(run, files, cancel=job.token, progress=self._progress(job), job=job)
        stored = []
        for path in result.get("dicom_segmentation") or []:
            if path:
                job.token.check()
                stored.append(orthanc.upload(path))
        result = in_download(result, job)
        echo = {k: v for k, v in (result.get("request") or {}).items() if k != "series_folders"}
        result["request"] = dict(echo, series_ids=job.fields["series_ids"])
        result["orthanc_upload"] = {"uploaded_instance_count": len(stored), "responses": stored}
        return result

    def _submit(self, job, work):
        try:
            return self.runner.submit(job, work)
        except BaseException:
            self.jobs.discard(job)
            raise

    def _progress(self, job):
        def progress(message, *args, **kw):
            job.token.check()  # a step of the study is a piece too: a cancelled job stops here
            job.say(message, *args, **kw)
            log.info("auto: job %s: %s", job.id[:8], job.progress["message"])
        return progress

    def _run_paths(self, job):
        with self._files(job.user) as files:
            return self.run_study(job.fields, files, cancel=job.token, progress=self._progress(job), job=job)

    def _run_upload(self, job):
        job.say("unpacking the upload")
        os.makedirs(job.inputs)
        os.makedirs(job.output)
        unpack_archive(job.upload, job.inputs, self.limits, cancel=job.token)
        os.unlink(job.upload)
        self.jobs.measure(job)
        fields = dict(job.fields, study_path=job.inputs, output_dir=job.output)
        with folder_files(job.folder, "this job's folder (the uploaded archive)", job.user, base=job.inputs,
                          scratch=self.jobs.spool, limit=self.limits.max_unpacked_bytes) as files:
            result = self.run_study(fields, files, cancel=job.token, progress=self._progress(job), job=job)
        job.token.check()
        job.say("zipping the outputs")
        self.jobs.zip_outputs(job)
        return in_download(result, job)

    def cancel(self, job, reason):
        """Cancel ``job`` if unfinished (True), else False (see ``JobRunner.cancel``)."""
        return self.runner.cancel(job, reason)

    def status(self, job):
        """What ``GET /jobs/{id}`` answers."""
        out = job.public()
        where = self.runner.position(job)
        if where is not None:
            out["queue"] = where
        return out

    def drain(self):
        """SIGTERM: no new job starts, the queued ones fail (503); returns how many were queued."""
        return self.runner.drain("the server is shutting down")

    def sweep(self):
        """The reaper's round: predictors unused for their TTL, jobs past theirs."""
        self.segmenter.cache.sweep()
        self.jobs.expire()

    def close(self):
        self.runner.close()
        self.segmenter.cache.expire()
        self.jobs.close()
        self.guard.close()

    # ------------------------------------------------------------------ what clients see

    def model_info(self):
        """``{id: description}`` of every registered model: names, aliases, labels (names, colours, terminology),
        default arguments, metadata, channels, license. No server path. TotalSegmentator entries are not downloaded
        for this: their labels come from TotalSegmentator's class map when it is installed."""
        out, failed = {}, self.load_failures()
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
            if mid in failed:
                info["available"], info["unavailable_reason"] = False, failed[mid]
            out[mid] = info
        return out

    def model_info_clean(self):
        """The established ``/model_info_clean``: ``model_info`` with each model's ``metadata`` the list of its
        segments ``{"Label ID": <dataset.json name>, "Name": <segment label>, "Index": <label value>}`` and the
        ``description`` / ``description_long`` texts the established server writes from them."""
        out = {}
        for mid, info in self.model_info().items():
            model = info.get("model_information") or {}
            by_value = {v: k for k, v in (model.get("labels") or {}).items()}
            rows = [{"Label ID": by_value.get(s["value"], s["name"]), "Name": s["name"], "Index": s["value"]}
                    for s in info.get("labels") or []]
            channels = model.get("channel_names") or {}
            out[mid] = dict(info, metadata=rows, description="\n".join([
                "Segments the following regions:", ", ".join(str(r["Label ID"]) for r in rows),
                "Number of input channels:", str(len(channels))]), description_long="\n".join([
                    "Segments the following regions:", *["\t- " + _pairs(r) for r in rows],
                    "Uses the following channels:", "\t- " + _pairs(channels)]))
        return out

    def load_failures(self):
        """``{model id: message}`` of the models whose default folds and checkpoint failed to load recently."""
        out = {}
        for key, (model, message) in self.segmenter.cache.failures().items():
            try:
                args = self.segmenter.arguments(model)
            except Exception:  # a model that left the registry, or whose defaults no longer parse
                continue
            if (tuple(str(f) for f in args["use_folds"]), args["checkpoint_name"]) == key[1:]:
                out[model] = message
        return out

    def unavailable_models(self):
        """``{model id: why}`` of the registered models that cannot serve now (files missing or broken at start-up
        and still, or a failed load of their defaults)."""
        out = {mid: reason for mid in self.registry.ids() if (reason := self.registry.unavailable_reason(mid))}
        for mid, message in self.load_failures().items():
            out.setdefault(mid, message)
        return out

    def readiness(self):
        """``(ready, body)``: the registry loaded, the device usable and at least one model able to serve (the others
        listed in ``unavailable_models`` with the reason)."""
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
        unavailable = self.unavailable_models()
        available = len(self.registry) - len(unavailable)
        ready = loaded and usable and available > 0
        if usable and not available:
            why = "none of the %d registered model(s) can serve now (unavailable_models says why)" % len(self.registry)
        body = {"status": "ok" if ready else "unavailable", "models_loaded": loaded, "models": len(self.registry),
                "models_available": available, "unavailable_models": unavailable,
                "device": str(device), "device_usable": usable, "gpu_available": gpu, "max_free_mem": free_mib,
                "predictor_cache": self.segmenter.cache.stats(), "jobs": self.jobs.counts(),
                "runs": self.runner.stats(), "infer_on_paths": bool(self.guard)}
        if why:
            body["detail"] = why
        return ready, body


def _pairs(d):
    return ", ".join("%s: %s" % kv for kv in d.items())


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


def in_download(result, job):
    """The output paths of an upload job's answer as they are named in its /download zip (``output/stage_0/...``),
    the request's folders as the client named them: no server path."""
    def rel(path):
        return os.path.relpath(path, job.folder) if isinstance(path, str) and os.path.isabs(path) else path

    out = dict(result)
    for key in pipeline.OUTPUT_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [rel(p) for p in out[key]]
    if isinstance(out.get("request"), dict):
        out["request"] = {k: v for k, v in out["request"].items() if k not in ("study_path", "output_dir")}
    return out
