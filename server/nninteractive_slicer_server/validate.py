"""Checks of client input, done before the library sees it, so that every mistake gets a 400 that says what
was wrong and what to do (instead of an assertion deep in the library or a 500)."""

import math
import numbers

import numpy as np


class BadInput(ValueError):
    """The request is wrong; the message is sent back to the client with HTTP 400."""


def require(cond, message, *args):
    """BadInput(``message % args``) unless ``cond``; the message is formatted only then (checks run on every
    request)."""
    if not cond:
        raise BadInput(message % args if args else message)


def flag(payload, name, default=None):
    value = payload.get(name, default)
    require(isinstance(value, bool), "'%s' must be true or false, got %r", name, value)
    return value


def image_header(shape, dtype, image_channels):
    """What a packed image declares, checked before it is allocated (``image`` checks the decoded values)."""
    require(len(shape) == 4, "the image must be 4D [channels, x, y, z]; got %dD with shape %s. Add a leading channel "
                             "axis (image[None]).", len(shape), list(shape))
    require(dtype.kind in "biuf", "the image dtype %s is not numeric", dtype)
    require(all(d > 0 for d in shape), "the image shape %s has an empty axis", list(shape))
    require(shape[0] == image_channels, "the model expects %d image channel(s); the image has %d (shape %s)",
            image_channels, shape[0], list(shape))


def image(arr, image_channels):
    image_header(arr.shape, arr.dtype, image_channels)
    if arr.dtype.kind == "f":
        require(bool(np.isfinite(arr).all()), "the image contains NaN or infinite values")
    require(bool(arr.any()), "the image is entirely zero; there is nothing to segment")


def target_buffer_request(payload, image_shape):
    require(image_shape is not None, "no image yet: send set_image before set_target_buffer")
    shape = payload.get("shape")
    require(isinstance(shape, list) and len(shape) == 3, "'shape' must be a list of 3 positive integers, got %r",
            shape)
    require(all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape),
            "'shape' must hold 3 positive integers, got %r", shape)
    require(tuple(shape) == tuple(image_shape[1:]), "the target buffer shape %s does not match the image's spatial "
            "shape %s", list(shape), list(image_shape[1:]))
    try:
        dtype = np.dtype(payload.get("dtype"))
    except TypeError:
        raise BadInput("'dtype' %r is not a dtype; use uint8" % (payload.get("dtype"),))
    require(dtype.kind in "biu", "the target buffer dtype %s is not supported; use bool or an integer type such as "
            "uint8", dtype)
    return tuple(shape), dtype


def ready_for_prompt(session):
    require(session.original_image_shape is not None, "no image yet: send set_image before any prompt")
    require(session.target_buffer is not None, "no target buffer yet: send set_target_buffer after set_image")


def _number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def point(payload, spatial_shape):
    coords = payload.get("coordinates")
    require(isinstance(coords, list) and len(coords) == 3 and all(_number(c) for c in coords),
            "'coordinates' must be 3 finite numbers, got %r", coords)
    rounded = [int(round(c)) for c in coords]
    require(all(0 <= c < s for c, s in zip(rounded, spatial_shape)),
            "the point %s lies outside the image of shape %s", coords, list(spatial_shape))
    return coords


def bbox(payload, spatial_shape, supports_3d):
    box = payload.get("bbox_coords")
    require(isinstance(box, list) and len(box) == 3 and all(
        isinstance(b, list) and len(b) == 2 and all(_number(v) for v in b) for b in box),
        "'bbox_coords' must be 3 [start, end] pairs, got %r", box)
    sizes = [round(hi) - round(lo) for lo, hi in box]
    require(all(s > 0 for s in sizes), "the box %s is empty or inverted on some axis (start must be < end)", box)
    require(all(round(hi) > 0 and round(lo) < s for (lo, hi), s in zip(box, spatial_shape)),
            "the box %s lies outside the image of shape %s", box, list(spatial_shape))
    require(supports_3d or 1 in sizes, "the box %s is 3D (sizes %s) but this model accepts only 2D boxes: make it "
            "one voxel thick on one axis", box, sizes)
    return box


def mask_prompt(mask, meta, spatial_shape, kind):
    require(mask.ndim == 3, "the %s must be a 3D array, got %dD", kind, mask.ndim)
    require(mask.dtype.kind in "biuf", "the %s dtype %s is not numeric", kind, mask.dtype)
    box = meta.get("interaction_bbox")
    if box is None:
        require(tuple(mask.shape) == tuple(spatial_shape), "the %s shape %s does not match the image's spatial shape "
                "%s (or pass interaction_bbox)", kind, list(mask.shape), list(spatial_shape))
    else:
        require(isinstance(box, list) and len(box) == 3 and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) for v in b) for b in box),
            "'interaction_bbox' must be 3 [start, end] integer pairs, got %r", box)
        require(all(0 <= lo < hi <= s for (lo, hi), s in zip(box, spatial_shape)),
                "'interaction_bbox' %s does not lie inside the image of shape %s", box, list(spatial_shape))
        require(list(mask.shape) == [hi - lo for lo, hi in box], "the %s shape %s does not match interaction_bbox %s",
                kind, list(mask.shape), box)
    require(bool(mask.any()), "the %s is empty: draw something first", kind)
    return box


def initial_seg(mask, spatial_shape):
    require(mask.ndim == 3 and tuple(mask.shape) == tuple(spatial_shape), "the initial segmentation shape %s does "
            "not match the image's spatial shape %s", list(mask.shape), list(spatial_shape))
    require(mask.dtype.kind in "biu", "the initial segmentation dtype %s is not supported; use uint8", mask.dtype)
