"""The model, loaded once, and the one thread that runs every forward pass.

All sessions share one network by reference (one copy of the weights on the device). Predictions are
serialized on a single long-lived thread (``scheduler.DeviceQueue``: prompts first, automatic models in pieces
between them): the device is one resource, and cuDNN's autotuning cache is thread-local, so the warm-up must run on
the thread that later predicts. Uploads, decoding and image preprocessing of other sessions run elsewhere and
proceed meanwhile.
"""

import contextvars
import logging
import time

from .scheduler import DeviceQueue

log = logging.getLogger("nninteractive_slicer_server")


class Engine:
    def __init__(self, model_dir, fold, checkpoint, device, torch_n_threads, use_torch_compile, do_autozoom,
                 verbose=False, enable_undo=True, model_name=None):
        import torch
        from nnInteractive.inference.inference_session import nnInteractiveInferenceSession

        self._session_class = nnInteractiveInferenceSession
        self.device = torch.device(device)
        self.model_dir = str(model_dir)
        self.model_name = model_name or self.model_dir
        self.use_torch_compile = bool(use_torch_compile)
        self._session_kwargs = dict(device=self.device, use_torch_compile=self.use_torch_compile, verbose=verbose,
                                    torch_n_threads=torch_n_threads, do_autozoom=do_autozoom,
                                    enable_undo=enable_undo)
        started = time.perf_counter()
        loader = nnInteractiveInferenceSession(**dict(self._session_kwargs, use_torch_compile=False))
        self.artifacts = loader._load_model_artifacts_from_disk(self.model_dir, fold, checkpoint)
        loader.executor.shutdown(wait=False)
        del loader
        init = None
        if self.device.type == "cuda" and self.device.index is not None:
            init = torch.cuda.set_device  # the current device is per thread
        # The prediction thread and what waits for it (prompts, automatic runs' pieces), for /x/queue and the metrics
        self.queue = DeviceQueue(initializer=init, initargs=(self.device,) if init else ())
        probe = self.new_session(compiled=False)
        self.capabilities = _capabilities(probe)
        self.license = probe.license
        self.close_session(probe)
        if self.use_torch_compile or self.device.type == "cuda":
            warm = self.new_session()
            if self.use_torch_compile:
                self.artifacts["network"] = warm.network  # every session shares the one compiled module
            self.queue.run(warm.warmup)
            self.close_session(warm)
        log.info("model %s loaded on %s in %.1f s (torch.compile %s)", self.model_name, self.device,
                 time.perf_counter() - started, "on" if self.use_torch_compile else "off")

    def new_session(self, compiled=True):
        kwargs = self._session_kwargs if compiled else dict(self._session_kwargs, use_torch_compile=False)
        session = self._session_class(**kwargs)
        session.initialize_from_loaded_artifacts(self.artifacts)
        session.executor = _CarryContext(session.executor)  # its background preprocessing logs the request id
        return session

    @staticmethod
    def close_session(session):
        """Free a session's image and buffers (never the shared network); never raises."""
        try:
            session._finish_preprocessing_and_initialize_interactions()
        except Exception:
            pass  # a failed preprocessing has nothing left to wait for
        try:
            session._reset_session()
            session.executor.shutdown(wait=False)
        except Exception:
            log.exception("error while freeing a session")

    def shutdown(self):
        self.queue.shutdown(wait=True)


class _CarryContext:
    """A session's background executor that runs each job in the submitter's context (logs.request_id_var)."""

    def __init__(self, inner):
        self._inner = inner

    def submit(self, fn, *args, **kwargs):
        return self._inner.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _capabilities(session):
    cfg = session.configuration_manager
    return {
        "supported_interactions": dict(session.supported_interactions),
        "channel_mapping": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in session.channel_mapping.items()},
        "num_interaction_channels": int(session.num_interaction_channels),
        "supports_initial_label": bool(session.supports_initial_label),
        "supports_zero_shot_label_refinement": bool(session.supports_zero_shot_label_refinement),
        "preferred_scribble_thickness": list(session.preferred_scribble_thickness),
        "interaction_decay": None if session.interaction_decay is None else float(session.interaction_decay),
        "patch_size": list(cfg.patch_size) if cfg is not None else None,
        "do_autozoom": bool(session.do_autozoom),
        "inference_session_version": session.INFERENCE_SESSION_VERSION,
        "license": session.license,
        "supports_undo": bool(session.supports_undo),
    }
