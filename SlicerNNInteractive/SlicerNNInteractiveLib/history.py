"""Each segment's prompts since its last reset, kept so that a server's session can be rebuilt to the same state.

nnInteractive keeps every prompt of the current object as input channels (written at a growing intensity, so that
newer prompts weigh more), and the previous prediction as one more channel. A segment sent back as an initial
segmentation after a lost session replaces all of them, so the next prompt would give another mask than in the
session the user had. A ``PromptHistory`` holds what rebuilds that state: its *base* (the segment sent as the initial
segmentation when the history started, or nothing after a reset) and every prompt sent since, in order, with the
server that answered each.

Replaying it (``replay``) on a session whose image is set, in one of three modes:

* ``FAST``: the server's buffer as the last prompt left it, as the initial segmentation, then every prompt with
  ``run_prediction=False``: no prediction at all. This is the state of the uninterrupted session, voxel for voxel,
  in nnInteractive 2.6 (its ``inference_session.py``): a prompt writes only its own channel and bumps the intensity
  (renormalisation included), both the same whatever ran in between; a prediction writes only the previous-prediction
  channel and the target buffer, with the same values, so that channel always equals the target buffer; and an
  initial segmentation resets the prompt channels and the intensity and writes both. Prompts added without a
  prediction queue their centres, but a prediction uses only the last one queued (the next prompt's own) and
  clears the queue. So the prompt channels and the intensity match, and the previous-prediction channel is the
  buffer. That buffer is the caller's segment as the last prompt left it (``server_segment``), except where the
  Segment Editor's masking cut a result as it was written: such a step keeps the server's region (``Step.raw``), and
  the buffer is the segment with those regions put back wherever no later result covered them. (A segment edited
  since its last prompt is not described by its history at all: it starts a new one.)
* ``FULL``: the base, then every prompt with its prediction: the same state when predictions are deterministic (on
  the CPU they are), used when a cut result's region was too large to keep (``MAX_RAW_BYTES``), and what another
  model would have made of the same prompts (``replay_on``).
* ``LAST``: the base, every prompt without a prediction but the last. Not the same state (the previous-prediction
  channel holds the base, not the last prediction, and only the last prompt's patch is predicted); kept to show it.

A history is a plain object that serialises to JSON (``to_json`` / ``from_json``) with a format version: points and
boxes in the volume's physical space (RAS millimetres, from the IJK-to-RAS matrix they were recorded under, which is
kept and must match the volume's when it is read back), scribble and lasso masks as their box and packed bits, the
base compressed with the project's one codec (``wire``). Reading one back trusts nothing (it comes from a scene file):
anything malformed, of another version, another image geometry or content, another segment, or a segment changed
after its last prompt raises ``HistoryError`` with the reason, and nothing of it is used.

Everything is in array order ``(k, j, i)`` (see ``geometry``), as the server takes it.
"""

import base64
import binascii
import json
import math
import time
import zlib

import numpy as np

FORMAT = "SlicerNNInteractive prompt history"
VERSION = 1
KINDS = ("point", "bbox", "scribble", "lasso")
FAST, FULL, LAST = "fast", "full", "last"

# Bounds: a history holds only what is needed since the last reset, but a user may click for hours without one.
MAX_STEPS = 2000  # prompts since the last reset; past this the history is dropped (the old recovery applies)
MAX_BASE_BYTES = 8 << 20  # the compressed base; a larger one is left out (FAST still works, FULL does not)
# A serialised history read back (from a scene file: anything); longer is refused unread. It also bounds what its
# masks unpack to (8 voxels a byte: ~100 MB at most).
MAX_TEXT_BYTES = 16 << 20
MAX_RAW_BYTES = 4 << 20  # a cut result's region (compressed); a larger one is not kept (then FULL is needed)
MAX_SERVERS = 64
# The base (a whole segment, mostly zeros): zstd clevel 3 after bitshuffle. On a 256x256x130 segment of two blobs
# (this machine, 2 cores): 1.4 KB in ~1.5 ms; lz4 as for uploads (wire.MASK_CODEC) gives 6 KB in a similar time.
BASE_CODEC = {"codec": "zstd", "clevel": 3, "filter": "bitshuffle"}
GRID_TOLERANCE = 0.01  # voxels: how far two IJK-to-RAS matrices may place the image's corners apart and still match


class HistoryError(ValueError):
    """A history that cannot be used; ``str(err)`` says why, in words a user can act on."""


def mask_digest(mask):
    """CRC-32 (hex) of a segment as the server gets it: its uint8 voxels in C order."""
    arr = np.ascontiguousarray(mask if mask.dtype == np.uint8 else np.asarray(mask).astype(np.uint8))
    return "%08x" % zlib.crc32(memoryview(arr.reshape(-1)).cast("B"))


def image_digest(image):
    """CRC-32 (hex) of an image's voxels, with its dtype and shape: the same image read again matches."""
    arr = np.ascontiguousarray(image)
    head = ("%s%s" % (arr.dtype.str, arr.shape)).encode("ascii")
    return "%08x" % zlib.crc32(memoryview(arr.reshape(-1)).cast("B"), zlib.crc32(head))


def same_grid(ijk_to_ras_a, ijk_to_ras_b, shape, tolerance=GRID_TOLERANCE):
    """Whether two IJK-to-RAS matrices place every voxel of an image of ``shape`` within ``tolerance`` voxels of each
    other (a file written and read back keeps its geometry only to the precision it was written with)."""
    a, b = np.asarray(ijk_to_ras_a, float), np.asarray(ijk_to_ras_b, float)
    rel = np.linalg.inv(b) @ a  # IJK under a -> IJK under b
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[2] - 1) for j in (0, shape[1] - 1) for k in (0, shape[0] - 1)])
    return float(np.abs(corners @ rel.T - corners).max()) <= tolerance


def _index_to_ras(matrix, index):
    """RAS of array index(es) ``(k, j, i)`` (N, 3) under an IJK-to-RAS matrix."""
    idx = np.asarray(index, float).reshape(-1, 3)[:, ::-1]
    return idx @ matrix[:3, :3].T + matrix[:3, 3]


def _ras_to_index(inverse, ras):
    """Nearest array index(es) ``(k, j, i)`` of RAS point(s) under an RAS-to-IJK matrix."""
    pts = np.asarray(ras, float).reshape(-1, 3)
    ijk = pts @ inverse[:3, :3].T + inverse[:3, 3]
    return np.floor(ijk + 0.5).astype(np.int64)[:, ::-1]


def _short(x):
    """A coordinate in the fewest digits that still read back to within a billionth of it."""
    return float("%.10g" % x)


def _b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text, what):
    if not isinstance(text, str):
        raise HistoryError("%s is not text" % what)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise HistoryError("%s is not valid base64" % what)


class Step(object):
    """One prompt as the server received it: ``kind`` (KINDS), ``positive``, and ``point`` (k, j, i), ``box`` (half-open
    ``[[lo, hi]] * 3``; for scribble / lasso the mask's ``interaction_bbox``) and ``mask`` (uint8 0/1 over ``box``).
    ``written``: the box of its result in the server's buffer (None: nothing changed). ``exact``: the result was
    written into the segment unchanged; when masking cut it, ``raw`` keeps the server's region over ``written``
    (packed; None when it was too large). ``by``: index of the server that answered, in the history's ``servers``."""

    __slots__ = ("kind", "positive", "point", "box", "mask", "written", "exact", "raw", "by", "_json")

    def __init__(self, kind, positive, point=None, box=None, mask=None, by=None):
        self.kind, self.positive = kind, bool(positive)
        self.point, self.box, self.mask = point, box, mask
        self.written, self.exact, self.raw, self.by, self._json = None, True, None, by, None

    def cut(self, region):
        """Its result ``region`` (the server's, over ``written``) was not written as it was (masking)."""
        from .wire import pack_array

        packed = pack_array(np.asarray(region, np.uint8), **BASE_CODEC)
        self.exact, self.raw = False, packed if len(packed) <= MAX_RAW_BYTES else None

    def raw_region(self):
        from .wire import WireFormatError, unpack_array

        size = [hi - lo for lo, hi in self.written]
        try:
            region = unpack_array(self.raw, max_elements=max(1, int(np.prod(size))))
        except WireFormatError as exc:
            raise HistoryError("a %s's result region cannot be decoded (%s)" % (self.kind, exc))
        if list(region.shape) != size or region.dtype != np.uint8:
            raise HistoryError("a %s's result region is %s %s, not uint8 %s" % (self.kind, region.dtype,
                                                                                list(region.shape), size))
        return region

    @classmethod
    def from_args(cls, kind, args, positive, shape):
        """The step for ``SyncedSession.prompt``'s arguments, as ``RemoteSession`` sends them (points rounded as the
        library rounds them, boxes as integers; a mask cropped to what it holds, which the library treats the same).
        Returns None for a mask with values other than 0 and 1 (not recorded: the history is then dropped)."""
        if kind == "point":
            return cls(kind, positive, point=tuple(int(round(float(c))) for c in args["coordinates"]))
        if kind == "bbox":
            return cls(kind, positive, box=[[int(lo), int(hi)] for lo, hi in args["bbox"]])
        if kind not in KINDS:
            raise ValueError("unknown prompt kind %r" % (kind,))
        mask = np.asarray(args["mask"])
        box = args.get("interaction_bbox")
        box = [[0, int(n)] for n in mask.shape] if box is None else [[int(lo), int(hi)] for lo, hi in box]
        if mask.dtype != np.bool_ and mask.size and (int(mask.max()) > 1 or int(mask.min()) < 0):
            return None
        nonzero = mask != 0
        found = [np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        if any(len(f) == 0 for f in found):  # an empty mask still counts (it bumps the intensity): keep one voxel
            crop, box = np.zeros((1, 1, 1), np.uint8), [[lo, lo + 1] for lo, _ in box]
        else:
            sl = tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)
            crop = nonzero[sl].astype(np.uint8)
            box = [[lo + s.start, lo + s.stop] for (lo, _), s in zip(box, sl)]
        return cls(kind, positive, box=box, mask=crop)

    def args(self):
        """What ``SyncedSession.prompt`` takes for this step."""
        if self.kind == "point":
            return {"coordinates": self.point}
        if self.kind == "bbox":
            return {"bbox": [list(b) for b in self.box]}
        return {"mask": self.mask, "interaction_bbox": [list(b) for b in self.box]}

    def send(self, session, run_prediction):
        """Add this prompt to ``session`` (any object with the nnInteractive session API)."""
        if self.kind == "point":
            session.add_point_interaction(self.point, include_interaction=self.positive, run_prediction=run_prediction)
        elif self.kind == "bbox":
            session.add_bbox_interaction([list(b) for b in self.box], include_interaction=self.positive,
                                         run_prediction=run_prediction)
        else:
            method = session.add_scribble_interaction if self.kind == "scribble" else session.add_lasso_interaction
            method(self.mask, include_interaction=self.positive, run_prediction=run_prediction,
                   interaction_bbox=[list(b) for b in self.box])

    # --- JSON (cached: a step never changes once recorded, but it may be cut once)
    def to_obj(self, matrix, with_written=False):
        obj = {"kind": self.kind, "positive": self.positive}
        if self.kind == "point":
            obj["ras"] = [_short(x) for x in _index_to_ras(matrix, self.point)[0]]
        elif self.kind == "bbox":  # the centres of its first and last voxel
            corners = _index_to_ras(matrix, [[lo for lo, _ in self.box], [hi - 1 for _, hi in self.box]])
            obj["ras"] = [[_short(x) for x in c] for c in corners]
        else:
            obj["box"] = [list(b) for b in self.box]
            obj["bits"] = _b64(np.packbits(self.mask.reshape(-1)))
        if with_written and self.written is not None:  # only where a cut result makes boxes matter
            obj["written"] = [list(b) for b in self.written]
        if not self.exact:
            obj["exact"] = False
            if self.raw is not None:
                obj["raw"] = _b64(self.raw)
        if self.by is not None:
            obj["by"] = self.by
        return obj

    def to_json(self, matrix, with_written=False):
        key = (matrix.tobytes(), self.exact, with_written)
        if self._json is None or self._json[0] != key:
            self._json = (key, json.dumps(self.to_obj(matrix, with_written), separators=(",", ":")))
        return self._json[1]

    @classmethod
    def from_obj(cls, obj, inverse, shape, n_servers):
        """A step read back (``inverse``: the recorded RAS-to-IJK matrix); HistoryError when anything is off."""
        if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
            raise HistoryError("a prompt has no known kind (%s)" % ", ".join(KINDS))
        kind, positive = obj["kind"], obj.get("positive")
        if not isinstance(positive, bool):
            raise HistoryError("a %s prompt has no polarity" % kind)
        by = obj.get("by")
        if by is not None and (not isinstance(by, int) or isinstance(by, bool) or not 0 <= by < n_servers):
            raise HistoryError("a %s prompt names a server that is not listed" % kind)
        if kind in ("point", "bbox"):
            ras = np.asarray(_numbers(obj.get("ras"), (3,) if kind == "point" else (2, 3), "a %s's position" % kind))
            index = _ras_to_index(inverse, ras)
            if kind == "point":
                point = tuple(int(x) for x in index[0])
                if not all(0 <= x < n for x, n in zip(point, shape)):
                    raise HistoryError("a point prompt lies outside the image")
                step = cls(kind, positive, point=point)
            else:
                box = [[int(min(a, b)), int(max(a, b)) + 1] for a, b in zip(index[0], index[1])]
                if not all(lo < n and hi > 0 for (lo, hi), n in zip(box, shape)):
                    raise HistoryError("a box prompt lies outside the image")
                step = cls(kind, positive, box=box)
        else:
            box = _box(obj.get("box"), shape, "a %s's box" % kind)
            size = int(np.prod([hi - lo for lo, hi in box]))
            bits = _unb64(obj.get("bits"), "a %s's mask" % kind)
            if len(bits) != (size + 7) // 8:
                raise HistoryError("a %s's mask has %d bytes; its box needs %d" % (kind, len(bits), (size + 7) // 8))
            mask = np.unpackbits(np.frombuffer(bits, np.uint8), count=size).reshape([hi - lo for lo, hi in box])
            step = cls(kind, positive, box=box, mask=mask)
        exact = obj.get("exact", True)
        if not isinstance(exact, bool):
            raise HistoryError("a %s prompt has a malformed 'exact'" % kind)
        step.exact, step.by = exact, by
        if obj.get("written") is not None:
            step.written = _box(obj["written"], shape, "a %s's result box" % kind)
        if not exact and obj.get("raw") is not None:
            if step.written is None:
                raise HistoryError("a %s's result region has no box" % kind)
            step.raw = _unb64(obj["raw"], "a %s's result region" % kind)
            step.raw_region()  # decodes and checks it now
        return step


def _numbers(value, shape, what):
    arr = np.asarray(value, dtype=object) if isinstance(value, list) else None
    if arr is None or arr.shape != shape:
        raise HistoryError("%s is not %s numbers" % (what, " x ".join(str(n) for n in shape)))
    flat = arr.reshape(-1)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in flat):
        raise HistoryError("%s holds something that is not a finite number" % what)
    return np.asarray(flat, float).reshape(shape)


def _box(value, shape, what):
    if not (isinstance(value, list) and len(value) == 3 and all(
            isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
            for b in value)):
        raise HistoryError("%s is not three [start, stop] pairs of integers" % what)
    if not all(0 <= lo < hi <= n for (lo, hi), n in zip(value, shape)):
        raise HistoryError("%s %s does not lie inside the image %s" % (what, value, list(shape)))
    return [list(b) for b in value]


class PromptHistory(object):
    """One segment's prompts since its last reset; see the module docstring.

    In memory (not serialised): ``version`` (the caller's version of the segment as the last step left it, None while
    a result is on its way), ``state`` (the digest of that segment, when the caller computed it: it recognises the
    same voxels under a new version) and ``image_state`` (which image, at which version, the prompts were made on).
    """

    def __init__(self, shape, segment_key=None):
        self.shape = tuple(int(n) for n in shape)
        self.segment_key = segment_key
        self.base = None  # packed (wire) bytes of the initial segmentation; None: started from a reset
        self.base_omitted = False  # there was one, too large to keep
        self.steps = []
        self.servers = []
        self.version = None
        self.state = None
        self.image_state = None
        self.recorded_under = None  # read back: {"ijk_to_ras", "image", "state"} as written
        self._base_text = None  # the base in base64, made once

    # ------------------------------------------------------------------ building

    @classmethod
    def start(cls, shape, segment=None, segment_key=None):
        """A new history whose base is ``segment`` (None or empty: a reset)."""
        history = cls(shape, segment_key)
        if segment is not None and segment.any():
            from .wire import pack_array

            packed = pack_array(segment if segment.dtype == np.uint8 else segment.astype(np.uint8), **BASE_CODEC)
            if len(packed) <= MAX_BASE_BYTES:
                history.base = packed
            else:
                history.base_omitted = True
        return history

    def server_index(self, description):
        """Index of ``description`` (a dict) in ``servers``, added when new."""
        if description is None:
            return None
        for n, known in enumerate(self.servers):
            if known == description:
                return n
        if len(self.servers) >= MAX_SERVERS:
            return None
        self.servers.append(dict(description))
        return len(self.servers) - 1

    def add(self, step, server=None):
        """Record ``step`` (answered by ``server``, a dict). False when the history is full (MAX_STEPS)."""
        if len(self.steps) >= MAX_STEPS:
            return False
        step.by = self.server_index(server)
        self.steps.append(step)
        self.state = None
        return True

    def pop(self):
        """Forget the last prompt (it was undone). Returns it, or None when there is none."""
        self.state = None
        return self.steps.pop() if self.steps else None

    def unpredict(self):
        """Forget the result of the last Run (it was undone): its prompts stay, as added without a prediction (the
        server's undo of a prediction restores the state before it, prompts included)."""
        self.state = None
        last = self.steps[-1] if self.steps else None
        if last is not None and last.written is not None:
            last.written, last.exact, last.raw, last._json = None, True, None, None

    def copy(self):
        other = PromptHistory(self.shape, self.segment_key)
        other.base, other.base_omitted = self.base, self.base_omitted
        other.steps = list(self.steps)  # a step is not changed once recorded (but for being cut, once)
        other.servers = [dict(s) for s in self.servers]
        other.version, other.state, other.image_state = self.version, self.state, self.image_state
        other.recorded_under = self.recorded_under
        return other

    # ------------------------------------------------------------------ state

    @property
    def exact(self):
        """Whether the segment the caller holds equals the server's buffer (no result was changed by masking)."""
        return all(s.exact for s in self.steps)

    @property
    def rebuildable(self):
        """Whether the server's buffer follows from the caller's segment (``server_segment``)."""
        return all(s.exact or s.raw is not None for s in self.steps)

    def server_segment(self, segment):
        """The server's buffer as the last prompt left it, from the caller's ``segment`` as the last prompt left it:
        the segment itself, but where masking cut a result: there, each voxel holds what the last result covering it
        was on the server (see the module docstring)."""
        if self.exact:
            return segment
        if not self.rebuildable:
            raise HistoryError("a result cut by masking was too large to keep")
        buffer = np.array(segment, dtype=np.uint8)
        for step in self.steps:
            if step.written is None:
                continue
            sl = tuple(slice(lo, hi) for lo, hi in step.written)
            buffer[sl] = segment[sl] if step.exact else step.raw_region()
        return buffer

    def base_mask(self):
        """The base as a uint8 array, or None (a reset). HistoryError when it was too large to keep."""
        if self.base_omitted:
            raise HistoryError("the segmentation this history started from was too large to keep")
        if self.base is None:
            return None
        from .wire import WireFormatError, unpack_array

        try:
            mask = unpack_array(self.base, max_elements=int(np.prod(self.shape)))
        except WireFormatError as exc:
            raise HistoryError("the segmentation this history starts from cannot be decoded (%s)" % exc)
        if mask.shape != self.shape or mask.dtype != np.uint8:
            raise HistoryError("the segmentation this history starts from is %s %s, not uint8 %s"
                               % (mask.dtype, list(mask.shape), list(self.shape)))
        return mask

    def replay_mode(self, version, image_state, segment=None):
        """How this history rebuilds the server's state for a segment at ``version`` on the image ``image_state``:
        FAST, FULL, or None when it does not apply (another image, the segment edited since, or it needs its base
        and has none). ``segment``: the segment itself, compared with ``state`` when only its version changed (Slicer
        gives a segment a new version when another segment on its labelmap layer is written)."""
        if version is None or image_state != self.image_state:
            return None
        if version != self.version:
            if self.state is None or segment is None or mask_digest(segment) != self.state:
                return None
            self.version = version  # the same voxels
        if self.rebuildable:
            return FAST
        return None if self.base_omitted else FULL

    def summary(self):
        kinds = {}
        for s in self.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return {"segment": self.segment_key, "prompts": len(self.steps), "kinds": kinds,
                "base": "omitted" if self.base_omitted else ("segmentation" if self.base else "empty"),
                "exact": self.exact, "servers": [dict(s) for s in self.servers]}

    # ------------------------------------------------------------------ JSON

    def to_json(self, ijk_to_ras=None, image=None, state=None):
        """The history as JSON text. ``ijk_to_ras``: the volume's matrix (default: identity, voxel units);
        ``image``: the image's digest (``image_digest``); ``state``: the digest of the segment as the last step left
        it (``mask_digest``), checked when the history is read back."""
        matrix = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, float)
        head = {"format": FORMAT, "version": VERSION, "segment": self.segment_key, "shape": list(self.shape),
                "ijk_to_ras": [[_short(x) for x in row] for row in matrix.tolist()],
                "image": image, "state": state, "servers": self.servers,
                "base": {"omitted": True} if self.base_omitted else (
                    None if self.base is None else {"mask": self._base_b64()})}
        text = json.dumps(head, separators=(",", ":"))
        written = not self.exact  # result boxes matter only to rebuild the server's buffer around a cut result
        steps = ",".join(s.to_json(matrix, written) for s in self.steps)
        return text[:-1] + ',"steps":[' + steps + "]}"

    def _base_b64(self):
        if self._base_text is None or self._base_text[0] is not self.base:
            self._base_text = (self.base, _b64(self.base))
        return self._base_text[1]

    @classmethod
    def from_json(cls, text):
        """A history read back; HistoryError when it is not one this version reads (see the module docstring)."""
        if not isinstance(text, str) or not text:
            raise HistoryError("the saved prompt history is empty")
        if len(text) > MAX_TEXT_BYTES:
            raise HistoryError("the saved prompt history is %d bytes; at most %d are read" % (len(text), MAX_TEXT_BYTES))
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise HistoryError("the saved prompt history is not valid JSON (%s)" % exc)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise HistoryError("the saved text is not a SlicerNNInteractive prompt history")
        if obj.get("version") != VERSION:
            raise HistoryError("the saved prompt history has format version %r; this module reads version %d"
                               % (obj.get("version"), VERSION))
        shape = obj.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(
                isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 for n in shape)):
            raise HistoryError("the saved prompt history has no valid image shape")
        matrix = _numbers(obj.get("ijk_to_ras"), (4, 4), "its IJK-to-RAS matrix")
        if not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise HistoryError("the saved prompt history's IJK-to-RAS matrix is not an invertible affine matrix")
        segment = obj.get("segment")
        if segment is not None and not isinstance(segment, str):
            raise HistoryError("the saved prompt history names no valid segment")
        for field in ("image", "state"):
            if obj.get(field) is not None and not isinstance(obj[field], str):
                raise HistoryError("the saved prompt history's %s digest is malformed" % field)
        servers = obj.get("servers") or []
        if not isinstance(servers, list) or len(servers) > MAX_SERVERS or not all(
                isinstance(s, dict) and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
                                            for k, v in s.items()) for s in servers):
            raise HistoryError("the saved prompt history's list of servers is malformed")
        steps = obj.get("steps")
        if not isinstance(steps, list) or len(steps) > MAX_STEPS:
            raise HistoryError("the saved prompt history's prompts are missing or more than %d" % MAX_STEPS)
        history = cls(shape, segment)
        history.servers = [dict(s) for s in servers]
        base = obj.get("base")
        if isinstance(base, dict) and base.get("omitted") is True:
            history.base_omitted = True
        elif isinstance(base, dict):
            history.base = _unb64(base.get("mask"), "the segmentation it starts from")
            history.base_mask()  # decodes and checks it now: a corrupt base is refused up front
        elif base is not None:
            raise HistoryError("the saved prompt history's starting segmentation is malformed")
        inverse = np.linalg.inv(matrix)
        history.steps = [Step.from_obj(s, inverse, history.shape, len(servers)) for s in steps]
        history.recorded_under = {"ijk_to_ras": matrix, "image": obj.get("image"), "state": obj.get("state")}
        return history

    def check(self, shape, ijk_to_ras=None, segment_key=None, image=None, segment=None):
        """Raise HistoryError unless this history (read back) belongs to the image of ``shape`` and ``ijk_to_ras``
        whose digest is ``image``, and to segment ``segment_key`` as it is now (``segment``, checked against the
        digest of the segment as the last prompt left it)."""
        recorded = self.recorded_under or {}
        if tuple(shape) != self.shape:
            raise HistoryError("the prompt history was recorded on an image of %s voxels; this one has %s"
                               % (list(self.shape), list(shape)))
        if ijk_to_ras is not None and recorded.get("ijk_to_ras") is not None and not same_grid(
                recorded["ijk_to_ras"], ijk_to_ras, self.shape):
            raise HistoryError("the prompt history was recorded on an image with another position, spacing or "
                               "orientation")
        if image is not None and recorded.get("image") not in (None, image):
            raise HistoryError("the prompt history was recorded on another image (its voxels differ)")
        if segment_key is not None and self.segment_key not in (None, segment_key):
            raise HistoryError("the prompt history belongs to segment %r, not %r" % (self.segment_key, segment_key))
        if segment is not None:
            if recorded.get("state") is None or mask_digest(segment) != recorded["state"]:
                raise HistoryError("the segment was changed after its last prompt (by hand or by another tool), so its "
                                   "prompts no longer describe it")


def replay(history, session, segment=None, mode=FULL, on_step=None):
    """Rebuild ``history``'s state on ``session`` (any object with the nnInteractive session API whose image, and
    target buffer or declared one, are set), in ``mode`` (see the module docstring). FAST needs ``segment``: the
    caller's segment as the last prompt left it. ``on_step(n)`` is called after each prompt. Returns
    ``{"mode", "prompts", "predictions", "seconds"}``."""
    t0 = time.perf_counter()
    if mode == FAST:
        if segment is None:
            raise ValueError("a FAST replay needs the segment as the last prompt left it")
        start = history.server_segment(segment if segment.dtype == np.uint8 else segment.astype(np.uint8))
    elif mode in (FULL, LAST):
        start = history.base_mask()
    else:
        raise ValueError("unknown replay mode %r; use %s, %s or %s" % (mode, FAST, FULL, LAST))
    if start is not None and start.any():
        session.add_initial_seg_interaction(start, run_prediction=False)
    else:
        session.reset_interactions()
    predictions = 0
    for n, step in enumerate(history.steps):
        predict = mode == FULL or (mode == LAST and n == len(history.steps) - 1)
        step.send(session, predict)
        predictions += predict
        if on_step is not None:
            on_step(n)
    return {"mode": mode, "prompts": len(history.steps), "predictions": predictions,
            "seconds": time.perf_counter() - t0}


def replay_on(history, session, image, mode=FULL, on_step=None):
    """``history``'s prompts on another session (another model or server: an in-process
    ``nnInteractiveInferenceSession`` or a ``RemoteSession``): sets ``image`` ([k, j, i] or [c, k, j, i]) and a target
    buffer, replays with predictions, and returns ``(mask, report)``: the segment that session ends with.
    ``on_step(n)``: called after each prompt (``replay``); an exception it raises stops the replay."""
    image = np.asarray(image)
    session.set_image(image if image.ndim == 4 else image[None])
    mask = np.zeros(history.shape, np.uint8)
    session.set_target_buffer(mask)
    report = replay(history, session, mode=mode, on_step=on_step)
    return mask, report
