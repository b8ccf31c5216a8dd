"""A segment's prompt history as a plain object: what it records of each prompt kind, its JSON (points and boxes in
the volume's physical space, masks as packed bits, the base through the wire codec), and that a corrupt or foreign
history is refused with a reason, never used. No server here (test_history_replay.py replays histories on servers)."""

import json

import numpy as np
import pytest

from test_scene_geometry import affine, rotation

from SlicerNNInteractiveLib import history as H
from SlicerNNInteractiveLib.history import HistoryError, PromptHistory, Step

SHAPE = (20, 24, 28)


def matrix():
    """An oblique, anisotropic IJK-to-RAS matrix with an origin, as a volume read from a file has."""
    return affine(rotation(2, 25) @ rotation(0, 10) @ np.diag([0.7, 1.1, 2.5]), [-20.25, 14.5, 3.125])


def scribble_volume():
    """A full-volume scribble (as a script may send it, without a box): two strokes on slice k=7."""
    m = np.zeros(SHAPE, np.uint8)
    m[7, 3:9, 5] = 1
    m[7, 10, 4:12] = 1
    return m


def steps():
    lasso = np.zeros((1, 6, 7), np.uint8)
    lasso[0, 1:5, 1:6] = 1
    return [
        Step.from_args("point", {"coordinates": (5, 6, 7)}, True, SHAPE),
        Step.from_args("bbox", {"bbox": [[3, 4], [2, 12], [5, 20]]}, False, SHAPE),
        Step.from_args("scribble", {"mask": scribble_volume()}, True, SHAPE),
        Step.from_args("lasso", {"mask": lasso, "interaction_bbox": [[9, 10], [2, 8], [3, 10]]}, False, SHAPE),
    ]


def recorded(base=None):
    h = PromptHistory.start(SHAPE, base, "Segment_1")
    for s in steps():
        assert h.add(s, {"url": "http://gpu:1527", "model": "blobs", "version": "2.6.0"})
    return h


def same_steps(a, b):
    assert len(a.steps) == len(b.steps)
    for x, y in zip(a.steps, b.steps):
        assert (x.kind, x.positive, x.point, x.box, x.exact, x.by) == (y.kind, y.positive, y.point, y.box, y.exact, y.by)
        assert (x.mask is None) == (y.mask is None)
        if x.mask is not None:
            assert np.array_equal(x.mask, y.mask)


def test_every_kind_round_trips_through_json_in_physical_space():
    base = np.zeros(SHAPE, np.uint8)
    base[2:9, 3:10, 4:15] = 1
    h = recorded(base)
    text = h.to_json(matrix(), image="0badf00d", state="12345678")
    obj = json.loads(text)
    assert obj["format"] == H.FORMAT and obj["version"] == H.VERSION and obj["segment"] == "Segment_1"
    # A point is stored where it is in the volume's RAS space, a box by its first and last voxels' centres.
    k, j, i = 5, 6, 7
    assert np.allclose(obj["steps"][0]["ras"], (matrix() @ [i, j, k, 1.0])[:3], atol=1e-6)
    assert np.allclose(obj["steps"][1]["ras"], [(matrix() @ [5, 2, 3, 1.0])[:3], (matrix() @ [19, 11, 3, 1.0])[:3]],
                       atol=1e-6)
    # A mask prompt is its box (the full-volume scribble cropped to its strokes) and packed bits.
    assert obj["steps"][2]["box"] == [[7, 8], [3, 11], [4, 12]]
    back = PromptHistory.from_json(text)
    same_steps(h, back)
    assert np.array_equal(back.base_mask(), base)
    assert back.servers == [{"url": "http://gpu:1527", "model": "blobs", "version": "2.6.0"}]
    assert all(s.by == 0 for s in back.steps)
    # What a step sends is what it was given (the scribble as its crop: the library treats both the same).
    assert back.steps[0].args() == {"coordinates": (5, 6, 7)}
    full = np.zeros(SHAPE, np.uint8)
    (k0, k1), (j0, j1), (i0, i1) = back.steps[2].box
    full[k0:k1, j0:j1, i0:i1] = back.steps[2].mask
    assert np.array_equal(full, scribble_volume())


def test_a_history_is_small():
    """A point or a box costs well under 200 bytes, a small scribble or lasso about as much; the base is compressed
    (the figures for the L phantom come from Testing/benchmark/history.py)."""
    base = np.zeros(SHAPE, np.uint8)
    base[2:9, 3:10, 4:15] = 1
    empty = len(PromptHistory.start(SHAPE, base, "Segment_1").to_json(matrix(), "0badf00d", "12345678"))
    sizes = [len(s.to_json(matrix())) for s in steps()]
    assert max(sizes) < 200, sizes
    assert empty < 600 and empty < base.size / 5  # header and base together: far less than the segment's voxels


def test_a_reset_or_an_initial_segmentation_starts_the_history_afresh():
    assert PromptHistory.start(SHAPE, None).base is None
    assert PromptHistory.start(SHAPE, np.zeros(SHAPE, np.uint8)).base is None  # an empty segment is a reset
    h = recorded()
    h.pop()
    assert [s.kind for s in h.steps] == ["point", "bbox", "scribble"]


def test_a_mask_with_other_values_than_0_and_1_is_not_recorded_and_an_empty_one_still_is():
    assert Step.from_args("scribble", {"mask": np.full((1, 2, 2), 3, np.uint8)}, True, SHAPE) is None
    empty = Step.from_args("lasso", {"mask": np.zeros((1, 3, 4), np.uint8), "interaction_bbox": [[4, 5], [1, 4], [2, 6]]},
                           True, SHAPE)
    assert empty.box == [[4, 5], [1, 2], [2, 3]] and not empty.mask.any()  # it still bumps the prompt intensity


def test_the_history_is_bounded(monkeypatch):
    monkeypatch.setattr(H, "MAX_STEPS", 3)
    h = PromptHistory.start(SHAPE)
    assert all(h.add(Step.from_args("point", {"coordinates": (1, 1, n)}, True, SHAPE)) for n in range(3))
    assert not h.add(Step.from_args("point", {"coordinates": (1, 1, 9)}, True, SHAPE))
    monkeypatch.setattr(H, "MAX_BASE_BYTES", 10)
    noise = (np.random.RandomState(0).rand(*SHAPE) > 0.5).astype(np.uint8)
    big = PromptHistory.start(SHAPE, noise)
    assert big.base is None and big.base_omitted
    assert big.replay_mode(None, None) is None
    with pytest.raises(HistoryError, match="too large"):
        big.base_mask()


def test_which_replay_applies():
    h = recorded()
    h.version, h.image_state = 7, ("vol", 1)
    assert h.replay_mode(7, ("vol", 1)) == H.FAST
    assert h.replay_mode(8, ("vol", 1)) is None  # the segment was edited since the last prompt
    assert h.replay_mode(7, ("vol", 2)) is None  # another image
    segment = np.zeros(SHAPE, np.uint8)
    segment[1:4, 2:5, 3:6] = 1
    h.state = H.mask_digest(segment)  # the segment's voxels as the last prompt left them
    assert h.replay_mode(9, ("vol", 1), segment) == H.FAST and h.version == 9  # a new version, the same voxels
    segment[0, 0, 0] = 1
    assert h.replay_mode(10, ("vol", 1), segment) is None
    h.steps[1].exact = False  # masking changed that result as it was written
    assert h.replay_mode(9, ("vol", 1)) == H.FULL
    h.add(Step.from_args("point", {"coordinates": (1, 2, 3)}, True, SHAPE))
    assert h.state is None  # a new prompt: the segment's voxels are not known until the caller says


def test_the_server_s_buffer_is_rebuilt_around_results_that_masking_cut():
    """Results written through masking leave the segment unlike the server's buffer; the history keeps the server's
    regions of those results, and rebuilds the buffer from the segment: also after a JSON round trip."""
    rng = np.random.RandomState(1)
    base = (rng.rand(*SHAPE) > 0.7).astype(np.uint8)
    allowed = np.zeros(SHAPE, bool)
    allowed[:, :12] = True  # the editable area, say
    server, segment = base.copy(), base.copy()
    h = PromptHistory.start(SHAPE, base)
    for n, (box, cut) in enumerate([([[2, 12], [4, 20], [3, 15]], True), ([[5, 9], [0, 24], [10, 28]], False),
                                     ([[0, 20], [10, 14], [0, 20]], True), ([[8, 10], [15, 18], [5, 6]], False)]):
        sl = tuple(slice(lo, hi) for lo, hi in box)
        region = (rng.rand(*[hi - lo for lo, hi in box]) > 0.5).astype(np.uint8)  # the server's result
        server[sl] = region
        segment[sl] = np.where(allowed[sl], region, segment[sl]) if cut else region
        step = Step.from_args("point", {"coordinates": (n, n, n)}, True, SHAPE)
        step.written = box
        if cut:
            step.cut(region)
        h.add(step)
    assert not h.exact and not np.array_equal(segment, server)
    assert np.array_equal(h.server_segment(segment), server)
    back = PromptHistory.from_json(h.to_json(matrix()))
    assert np.array_equal(back.server_segment(segment), server)
    h.version = back.version = 3
    assert h.replay_mode(3, None) == back.replay_mode(3, None) == H.FAST  # no prediction needed
    h.steps[0].raw = None  # a cut region too large to keep: only predicting every prompt again rebuilds the buffer
    assert h.replay_mode(3, None) == H.FULL


def corrupt(text, fn):
    obj = json.loads(text)
    fn(obj)
    return json.dumps(obj)


def _set(path, value):
    def fn(obj):
        target = obj
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
    return fn


CORRUPTIONS = [
    ("not json", lambda t: t[: len(t) // 2], "not valid JSON"),
    ("another format", lambda t: corrupt(t, _set(["format"], "something else")), "not a SlicerNNInteractive"),
    ("a later version", lambda t: corrupt(t, _set(["version"], 2)), "format version 2"),
    ("no shape", lambda t: corrupt(t, _set(["shape"], [20, 24])), "image shape"),
    ("a singular matrix", lambda t: corrupt(t, _set(["ijk_to_ras"], [[0] * 4] * 3 + [[0, 0, 0, 1]])), "invertible"),
    ("a NaN", lambda t: corrupt(t, _set(["steps", 0, "ras"], [float("nan"), 0, 0])), "not a finite number"),
    ("two numbers", lambda t: corrupt(t, _set(["steps", 0, "ras"], [1, 2])), "is not 3 numbers"),
    ("an unknown kind", lambda t: corrupt(t, _set(["steps", 0, "kind"], "blob")), "no known kind"),
    ("no polarity", lambda t: corrupt(t, _set(["steps", 1, "positive"], "yes")), "polarity"),
    ("a point outside", lambda t: corrupt(t, _set(["steps", 0, "ras"], [1e6, 0, 0])), "outside the image"),
    ("a box outside", lambda t: corrupt(t, _set(["steps", 3, "box"], [[9, 10], [2, 8], [3, 40]])), "inside the image"),
    ("mask bits cut", lambda t: corrupt(t, _set(["steps", 2, "bits"], "AAA=")), "bytes; its box needs"),
    ("bad base64", lambda t: corrupt(t, _set(["steps", 2, "bits"], "***")), "not valid base64"),
    ("an unknown server", lambda t: corrupt(t, _set(["steps", 0, "by"], 5)), "server that is not listed"),
    ("a corrupt base", lambda t: corrupt(t, _set(["base", "mask"], "TkpJQQEBAwV1aW50OA==")), "cannot be decoded"),
    ("a base of another shape", None, "not uint8"),
]


@pytest.mark.parametrize("name,damage,why", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_a_corrupt_history_is_refused_with_its_reason(name, damage, why):
    base = np.zeros(SHAPE, np.uint8)
    base[2:5, 3:6, 4:9] = 1
    text = recorded(base).to_json(matrix(), "0badf00d", "12345678")
    if damage is None:  # a well-formed packed array, of the wrong shape
        from SlicerNNInteractiveLib.wire import pack_array
        import base64

        other = base64.b64encode(pack_array(np.ones((2, 2, 2), np.uint8))).decode("ascii")
        damaged = corrupt(text, _set(["base", "mask"], other))
    else:
        damaged = damage(text)
    with pytest.raises(HistoryError, match=why):
        PromptHistory.from_json(damaged)


def test_too_many_prompts_or_too_much_text_is_refused_unread(monkeypatch):
    text = recorded().to_json(matrix())
    monkeypatch.setattr(H, "MAX_STEPS", 3)
    with pytest.raises(HistoryError, match="more than 3"):
        PromptHistory.from_json(text)
    monkeypatch.setattr(H, "MAX_TEXT_BYTES", 100)
    with pytest.raises(HistoryError, match="at most 100 are read"):
        PromptHistory.from_json(text)


def test_a_foreign_history_is_refused_on_check():
    """Another image (shape, geometry or voxels), another segment, or a segment edited after its last prompt."""
    image = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    segment = np.zeros(SHAPE, np.uint8)
    segment[3:6, 4:9, 5:12] = 1
    text = recorded().to_json(matrix(), H.image_digest(image), H.mask_digest(segment))
    h = PromptHistory.from_json(text)
    h.check(SHAPE, matrix(), "Segment_1", H.image_digest(image), segment)  # its own: accepted
    noisy = matrix() + 1e-7  # the matrix as a file with fewer digits gives it back: still the same grid
    h.check(SHAPE, noisy, "Segment_1", H.image_digest(image), segment)
    moved = matrix()
    moved[:3, 3] += moved[:3, 0]  # one voxel along I
    other_image = image.copy()
    other_image[0, 0, 0] += 1
    edited = segment.copy()
    edited[0, 0, 0] = 1
    for args, why in [
        (((20, 24, 29), matrix(), "Segment_1", None, None), "image of \\[20, 24, 28\\] voxels"),
        ((SHAPE, moved, "Segment_1", None, None), "another position, spacing or orientation"),
        ((SHAPE, matrix(), "Segment_1", H.image_digest(other_image), None), "another image"),
        ((SHAPE, matrix(), "Segment_2", None, None), "belongs to segment 'Segment_1'"),
        ((SHAPE, matrix(), "Segment_1", None, edited), "changed after its last prompt"),
    ]:
        with pytest.raises(HistoryError, match=why):
            h.check(*args)


def test_a_history_kept_on_a_segmentation_node_survives_a_mrml_file(tmp_path):
    """Slicer writes node attributes into the scene's .mrml (with ';' and '%' escaped): a history of 2000 prompts
    (~1 MB of JSON) comes back from a .mrml file byte for byte, under a segment ID with the characters that separate
    attributes there. (test_history_replay.py saves and reopens a whole scene as a .mrb.)"""
    from mrml import new_mrml_scene

    from SlicerNNInteractiveLib.slicerscene import historyAttributeName

    shape = (40, 64, 64)
    h = PromptHistory.start(shape)
    mask = np.zeros((1, 60, 60), np.uint8)
    mask[0, ::3, 5:50] = 1
    for n in range(H.MAX_STEPS):
        h.add(Step.from_args("lasso", {"mask": mask, "interaction_bbox": [[n % 40, n % 40 + 1], [2, 62], [1, 61]]},
                             n % 2 == 0, shape))
    text = h.to_json(matrix(), "0badf00d", "12345678")
    assert len(text) > 900000
    odd = 'Segment_1;a:b%3B "x" <&>'
    scene = new_mrml_scene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.SetAttribute(historyAttributeName(odd), text)
    node.SetAttribute(historyAttributeName("other"), "{}")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    back = new_mrml_scene()
    back.SetURL(str(tmp_path / "scene.mrml"))
    assert back.Import()
    node = back.GetFirstNodeByName("seg")
    assert node.GetAttribute(historyAttributeName(odd)) == text
    assert node.GetAttribute(historyAttributeName("other")) == "{}"
    same_steps(h, PromptHistory.from_json(node.GetAttribute(historyAttributeName(odd))))


def test_histories_of_removed_segments_are_not_kept_on_the_node():
    """A segment removed takes its history with it the next time one is stored: a new segment given the same ID
    (Slicer reuses "Segment_1") must not inherit it, and a scene file keeps none that nobody can use."""
    from mrml import new_mrml_scene

    from SlicerNNInteractiveLib.slicerscene import HISTORY_ATTRIBUTE, SlicerScene, historyAttributeName

    scene = new_mrml_scene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(segmentation)
    kept = SlicerScene(editor)
    for key in ("Segment_1", "Segment_2"):
        segmentation.GetSegmentation().AddEmptySegment(key, key)
        kept.store_history(key, '{"steps": []}')
    segmentation.SetAttribute("Other.Attribute", "x")  # not ours: untouched
    segmentation.GetSegmentation().RemoveSegment("Segment_1")
    kept.store_history("Segment_2", '{"steps": [1]}')
    names = [n for n in segmentation.GetAttributeNames() if n.startswith(HISTORY_ATTRIBUTE)]
    assert names == [historyAttributeName("Segment_2")] and segmentation.GetAttribute("Other.Attribute") == "x"
    segmentation.GetSegmentation().AddEmptySegment("Segment_1", "Segment_1")
    assert kept.stored_history("Segment_1") is None and kept.stored_history("Segment_2") == '{"steps": [1]}'
