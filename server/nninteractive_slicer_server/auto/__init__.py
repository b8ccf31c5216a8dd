"""Automatic segmentation with nnU-Net models: the model registry (``model-serve-spec.yaml``), nnU-Net's own
predictors in a TTL cache, and the wait for free GPU memory.

* ``registry``: load and check a spec (``load_registry``), look models up by id, alias or name, resolve their
  nnU-Net result folders (TotalSegmentator tasks through TotalSegmentator's own downloader), their labels
  (names, colours, coded terminology) and default arguments.
* ``predictors``: ``PredictorCache`` (nnUNetPredictor per result folder / folds / checkpoint, TTL + size bound),
  ``AutoSegmenter`` (run a registered model on an array: class subsets, probability thresholds, min_mem wait, its
  working memory from the server's budget, the prediction itself in pieces through a ``scheduler.DeviceQueue``: the
  server passes ``Engine.queue``, where the prompts run, first).
* ``pieces``: nnU-Net's sliding window and export cut into pieces (a tile, a class) for that queue.
* ``spec_cli``: ``nninteractive-slicer-server-registry validate SPEC`` / ``list SPEC``.

Nothing here imports torch or nnU-Net at import time: the registry is usable (and its errors fast) without them.
"""

from .registry import (ModelSpec, ModelUnavailable, Registry, Segment, SpecError, UnknownModel,  # noqa: F401
                       load_registry, spec_path_from)
