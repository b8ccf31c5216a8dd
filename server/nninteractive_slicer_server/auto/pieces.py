"""nnU-Net's prediction of one preprocessed image, cut into pieces for the prediction thread's queue
(``scheduler.DeviceQueue.run_pieces``): each piece is the code between two ``yield``, so a prompt waits at most for
one of them.

* ``logits_steps`` is ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (nnunetv2 2.x,
  ``inference/predict_from_raw_data.py``) driven with its public parts: per fold, load the fold's parameters and
  allocate the half-precision accumulators (one piece); per sliding-window tile (``_internal_get_sliding_window_
  slicers``), ``_internal_maybe_mirror_and_predict`` weighted by the gaussian (one piece each); divide, check for
  infinities and revert the padding (one piece); add to the sum of the folds. The same operations, in the same order
  and dtypes, as nnU-Net's: the logits are equal (tests compare them). On CUDA with results on the device, a fold that
  fails (out of memory) is run again with results on the CPU, as nnU-Net does.
* ``export_steps`` is ``convert_predicted_logits_to_segmentation_with_correct_shape`` (``inference/export_
  prediction.py``) one class at a time. nnU-Net's resampling treats each channel alone, so each class's logits are
  resampled to the image's grid by themselves and folded into a running argmax (regions: sigmoid > 0.5, in
  ``regions_class_order``): the export holds one class at full resolution, never all of them (nnU-Net's converts all
  of them to float64 at once: classes x voxels x 8 bytes). The labels are equal to nnU-Net's. With probabilities the
  map is itself the output (classes x voxels, float32): it is filled class by class and normalised (softmax or
  sigmoid) slab by slab.

Thread-local torch state (inference mode, autocast, the thread count) is entered and left inside each piece: other
work runs on the same thread between two pieces.
"""

import contextlib
import logging

import numpy as np

log = logging.getLogger("nninteractive_slicer_server")

SLAB_VOXELS = 1 << 21  # voxels of the image's grid per piece of the probabilities' normalisation


def expected_pieces(predictor, data_shape, props, channels, probabilities=False):
    """How many pieces ``logits_steps`` then ``export_steps`` take (for the queue's positions): per fold one to
    start it, one per tile and one to end it; one per class exported; one per slab of the probabilities; one to
    end."""
    patch = list(predictor.configuration_manager.patch_size)
    spatial = [int(s) for s in data_shape[1:]]
    k = len(spatial) - len(patch)
    padded = spatial[:k] + [max(s, p) for s, p in zip(spatial[k:], patch)]
    tiles = len(predictor._internal_get_sliding_window_slicers(padded))
    slabs = len(_slabs(props["shape_after_cropping_and_before_resampling"])) if probabilities else 0
    return len(predictor.list_of_parameters) * (tiles + 2) + int(channels) + slabs + 1


@contextlib.contextmanager
def device_piece(device):
    """What nnU-Net's prediction runs under, for one piece: inference mode, autocast on CUDA, and at most nnU-Net's
    ``default_num_processes`` torch threads (its ``predict_logits_from_preprocessed_data`` caps them so). On a GPU
    the piece ends when the device has done its work: kernels are launched asynchronously, and without the wait the
    thread would queue tile after tile on the device, and a prompt would wait behind all of them there."""
    import torch
    from nnunetv2.configuration import default_num_processes

    threads = torch.get_num_threads()
    if threads > default_num_processes:
        torch.set_num_threads(default_num_processes)
    try:
        with torch.inference_mode():
            if device.type == "cuda":
                with torch.autocast(device.type, enabled=True):
                    yield
            else:
                yield
        if device.type == "cuda":  # (not when the piece failed: its error is the one to report)
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()
    finally:
        if threads > default_num_processes:
            torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------- logits

def logits_steps(model, data, run, mirroring=False):
    """Generator (pieces: see the module docstring): the folds' averaged logits of ``model`` (a
    ``predictors.LoadedPredictor``) for the preprocessed ``data`` (``[c, *spatial]`` CPU tensor), on the CPU, at the
    network's resolution, as ``predict_logits_from_preprocessed_data`` computes them. ``run``: the queue's
    ``AutoRun``."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    p = model.predictor
    with device_piece(p.device):
        p.network = p.network.to(p.device)
        p.network.eval()
        padded, revert = pad_nd_image(data, p.configuration_manager.patch_size, "constant", {"value": 0}, True,
                                      None)
        slicers = p._internal_get_sliding_window_slicers(padded.shape[1:])
    folds = list(p.list_of_parameters)
    total = None
    try:
        for params in folds:
            fold = yield from _fold_steps(model, params, padded, slicers, revert, mirroring)
            with device_piece(p.device):
                if total is None:
                    total = fold
                else:
                    total += fold
            del fold
        if len(folds) > 1:
            with device_piece(p.device):
                total /= len(folds)
        return total
    finally:
        padded = None  # a cancelled run lets go of its padded copy at once


def _fold_steps(model, params, data, slicers, revert, mirroring):
    import torch

    p = model.predictor
    on_device = p.perform_everything_on_device and p.device.type != "cpu"
    if not on_device:
        return (yield from _window_steps(model, params, data, slicers, revert, mirroring, torch.device("cpu")))
    try:
        return (yield from _window_steps(model, params, data, slicers, revert, mirroring, p.device))
    except RuntimeError:
        log.warning("auto: the fold's prediction with results on %s failed (out of memory?); running it again with "
                    "results on the CPU, as nnU-Net does", p.device)
        _empty_cache(p.device)
        return (yield from _window_steps(model, params, data, slicers, revert, mirroring, torch.device("cpu")))


def _window_steps(model, params, data, slicers, revert, mirroring, results):
    """One fold's sliding window: ``_internal_predict_sliding_window_return_logits`` and the padding revert of
    ``predict_sliding_window_return_logits``, a tile per piece."""
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    p = model.predictor
    logits = counts = gaussian = on = None
    try:
        with device_piece(p.device):
            _empty_cache(p.device)
            model.load_parameters(params)
            on = data.to(results)
            logits = torch.zeros((p.label_manager.num_segmentation_heads, *on.shape[1:]), dtype=torch.half,
                                 device=results)
            counts = torch.zeros(on.shape[1:], dtype=torch.half, device=results)
            gaussian = compute_gaussian(tuple(p.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results) if p.use_gaussian else 1
        yield
        for sl in slicers:
            with device_piece(p.device):
                model.load_parameters(params)  # another run of this model may have loaded another fold meanwhile
                p.use_mirroring = bool(mirroring)
                tile = torch.clone(on[sl][None], memory_format=torch.contiguous_format).to(p.device)
                prediction = p._internal_maybe_mirror_and_predict(tile)[0].to(results)
                if p.use_gaussian:
                    prediction *= gaussian
                logits[sl] += prediction
                counts[sl[1:]] += gaussian
                del tile, prediction
            yield
        with device_piece(p.device):
            torch.div(logits, counts, out=logits)
            if torch.any(torch.isinf(logits)):
                raise RuntimeError("Encountered inf in predicted array. Aborting... If this problem persists, reduce "
                                   "value_scaling_factor in compute_gaussian or increase the dtype of "
                                   "predicted_logits to fp32")
            out = logits[(slice(None), *revert[1:])].to("cpu")
        logits = counts = None
        yield  # the division and the check over the whole image are a piece of their own
        return out
    finally:
        logits = counts = gaussian = on = None
        _empty_cache(p.device)


def _empty_cache(device):
    from nnunetv2.utilities.helpers import empty_cache

    empty_cache(device)


# ---------------------------------------------------------------------------------------------------------- export

def _slabs(shape):
    """Slices of the first axis of ``shape``, each about ``SLAB_VOXELS`` voxels."""
    per_slab = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    return [slice(i, min(i + per_slab, shape[0])) for i in range(0, shape[0], per_slab)]


def export_steps(predictor, logits, props, run, label_manager=None, channels=None, probabilities=False):
    """Generator (pieces: one per class, then the label map; with ``probabilities`` one per slab of the
    normalisation): ``convert_predicted_logits_to_segmentation_with_correct_shape`` of ``predictor`` (an
    ``nnUNetPredictor``) for ``logits`` (``[heads, *network grid]``) and the preprocessing's ``props``. Returns the
    label map (the image's grid, uint8 or uint16), or ``(labels, probabilities)`` when asked.

    ``channels``: the logits' channels to use, in order (default all), with ``label_manager`` describing them (a
    class subset: background and the chosen classes, softmax over them alone)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    lm = label_manager or predictor.label_manager
    channels = list(range(logits.shape[0])) if channels is None else [int(c) for c in channels]
    spacing = [props["spacing"][i] for i in pm.transpose_forward]
    cropped = props["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(cropped) else [spacing[0], *cm.spacing]
    resample = cm.resampling_fn_probabilities
    seg_dtype = np.uint8 if len(lm.foreground_labels) < 255 else np.uint16
    run.phase = "export"

    def one(c):
        """Class ``c``'s logits on the cropped image grid, as nnU-Net's resampling of all of them gives it."""
        return resample(logits[c:c + 1], cropped, current, spacing)[0]

    if probabilities:
        return (yield from _export_probabilities(lm, one, channels, props, seg_dtype, pm))

    best = labels = None
    for k, c in enumerate(channels):
        r = one(c)
        if lm.has_regions:  # nnU-Net: sigmoid, then each region > 0.5 in regions_class_order, later ones on top
            if labels is None:
                labels = np.zeros(r.shape, dtype=np.uint16)
            labels[lm.apply_inference_nonlin(r[None])[0].numpy() > 0.5] = lm.regions_class_order[k]
        elif best is None:
            best = np.array(r, copy=True)
            labels = np.zeros(r.shape, dtype=np.uint8 if len(channels) <= 256 else np.uint16)
        else:  # argmax: the first of equal values wins, as np.argmax
            better = r > best
            np.copyto(best, r, where=better)
            labels[better] = k
            del better
        del r
        yield
    best = None
    seg = np.zeros(props["shape_before_cropping"], dtype=seg_dtype)
    seg = insert_crop_into_image(seg, labels, props["bbox_used_for_cropping"])
    del labels
    return seg.transpose(pm.transpose_backward)


def _export_probabilities(lm, one, channels, props, seg_dtype, pm):
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, insert_crop_into_image

    shape = props["shape_before_cropping"]
    # nnU-Net's revert_cropping_on_probabilities: background 1 outside the crop (no region model)
    probs = torch.zeros((len(channels), *shape), dtype=torch.float32)
    if not lm.has_regions:
        probs[0] = 1
    inside = probs[(slice(None), *bounding_box_to_slice(props["bbox_used_for_cropping"]))]
    for k, c in enumerate(channels):
        inside[k] = torch.from_numpy(np.asarray(one(c))).float()
        yield
    crop_shape = inside.shape[1:]
    labels = np.zeros(crop_shape, dtype=np.uint16 if lm.has_regions else np.int64)
    for s in _slabs(crop_shape):
        with torch.no_grad():
            p = lm.apply_inference_nonlin(inside[:, s])
            inside[:, s] = p
            labels[s] = lm.convert_probabilities_to_segmentation(p.numpy())
            del p
        yield
    seg = np.zeros(shape, dtype=seg_dtype)
    seg = insert_crop_into_image(seg, labels, props["bbox_used_for_cropping"])
    del labels
    return (seg.transpose(pm.transpose_backward),
            probs.numpy().transpose([0] + [i + 1 for i in pm.transpose_backward]))
