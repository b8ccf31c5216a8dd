"""The controller against a real server: segment choice, queue, undo, reset, switching, masking, recovery, errors.

The oracle is a plain SyncedSession writing into a numpy segment with the same prompts: with no masking the
controller must produce the same segment voxel for voxel, through the labelmap-layer scene.
"""

import threading

import numpy as np
import pytest
import requests

from conftest import free_port, our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib import masking as M
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller, format_timing
from SlicerNNInteractiveLib.errors import ServerUnreachableError
from SlicerNNInteractiveLib.sync import SyncedSession

POINTS = [(20, 30, 18), (22, 28, 18), (18, 33, 20), (25, 25, 15)]


@pytest.fixture(scope="module")
def server(speckle_model, tmp_path_factory):
    with our_server(speckle_model, tmp_path_factory.mktemp("controller"), "--no-autozoom", "--max-sessions", "8") as (url, _):
        yield url


@pytest.fixture
def image():
    return make_image()[0]


class Events(object):
    def __init__(self):
        self.errors, self.results, self.busy = [], [], []

    def kwargs(self):
        return dict(on_error=lambda exc, job, dropped: self.errors.append((exc, job, dropped)),
                    on_result=lambda job, result, timings: self.results.append((job, timings)),
                    on_busy=lambda busy, n: self.busy.append((busy, n)))


@pytest.fixture
def make(server):
    made = []

    def factory(scene, url=None):
        ev = Events()
        c = Controller(scene, lambda: RemoteSession(url or server), **ev.kwargs())
        c.events = ev
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def oracle(server):
    made = []

    def run(image, prompts, segment=None):
        s = SyncedSession(lambda: RemoteSession(server))
        made.append(s)
        seg = np.zeros(image.shape, np.uint8) if segment is None else segment.copy()
        for kind, args, positive in prompts:
            if kind == "undo":
                r = s.undo()
                s.apply(r, seg)
                s.segment_written(None, segment=seg)
            else:
                s.prompt_and_apply(kind, args, image, seg, positive)
        return seg

    yield run
    for s in made:
        s.close()


def pt(n, positive=True):
    return ("point", {"coordinates": POINTS[n]}, positive)


def submit(c, prompt):
    kind, args, positive = prompt
    c.set_positive(positive)
    return c.submit(kind, args)


def test_first_prompt_creates_a_segment_and_matches_the_oracle(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    prompts = [pt(0), pt(1, False), ("bbox", {"bbox": [[10, 30], [20, 40], [18, 19]]}, True)]
    for p in prompts:
        submit(c, p)
    assert c.busy
    c.wait()
    key = scene.selected_segment()
    assert key is not None and scene.segment_keys() == [key]
    expected = oracle(image, prompts)
    assert expected.any()
    assert np.array_equal(scene.read_segment(key), expected)
    assert c.sync.uploads == {"image": 1, "segment": 1}
    assert c.events.errors == [] and len(c.events.results) == 3
    assert c.events.busy[-1] == (False, 0)
    for _, timings in c.events.results:
        for phase in ("prepare_ms", "exchange_ms", "apply_ms", "total_ms"):
            assert phase in timings
        assert "network+server" in format_timing(timings)


def test_queued_prompts_run_in_order_and_on_the_segment_they_were_placed_on(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    submit(c, pt(1))
    first = scene.selected_segment()
    second = c.next_segment()  # while the first ones are still queued
    assert c.positive
    submit(c, pt(2))
    c.wait()
    assert [j.segment_key for j, _ in c.events.results] == [first, first, second]
    assert np.array_equal(scene.read_segment(first), oracle(image, [pt(0), pt(1)]))
    assert np.array_equal(scene.read_segment(second), oracle(image, [pt(2)]))
    assert c.sync.uploads["segment"] == 2  # the second segment replaced the first on the server


def test_switching_back_continues_the_segment_where_its_prompts_left_it(Scene, make, oracle, image):
    """The server holds one segment's prompts at a time: switching back rebuilds them from the segment's prompt
    history (history.py), so the next prompt gives what it would have without the switch. On Slicer's labelmap layers
    the second segment shares the first one's layer, so the first one's version changes: its voxels are recognised."""
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    a = scene.selected_segment()
    c.next_segment()
    submit(c, pt(1))
    c.wait()
    scene.select_segment(a)
    submit(c, pt(2))
    c.wait()
    assert c.sync.uploads["segment"] == 3
    assert c.sync.replays == 1 and c.sync.last_replay["prompts"] == 1
    assert np.array_equal(scene.read_segment(a), oracle(image, [pt(0), pt(2)]))


def test_undo_restores_the_segment_and_the_server_continues_from_there(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    submit(c, pt(1, False))
    c.wait()
    key = scene.selected_segment()
    assert not np.array_equal(scene.read_segment(key), oracle(image, [pt(0)]))  # the negative point changed it
    assert c.can_undo()
    assert c.undo()
    c.wait()
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(0)]))
    submit(c, pt(2))
    c.wait()
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(0), pt(1, False), ("undo", None, True), pt(2)]))
    assert c.sync.uploads["segment"] == 1  # undone on the server too, nothing re-sent
    # Undo everything, then nothing left: Ctrl+Z belongs to the editor again.
    assert c.undo() and c.undo()
    c.wait()
    assert not scene.read_segment(key).any()
    assert not c.can_undo() and not c.undo()
    # The server keeps one undo level, so it could not follow all the way back: the next prompt must start
    # from the (now empty) segment the user sees, not from the server's stale one.
    submit(c, pt(3))
    c.wait()
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(3)]))


def test_undo_after_a_hand_edit_is_left_to_the_editor(Scene, make, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    key = scene.selected_segment()
    scene.edit(key, lambda m: m.__setitem__(np.s_[0:3, 0:3, 0:3], True))
    assert not c.can_undo()


def test_hand_edit_is_sent_before_the_next_prompt(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    key = scene.selected_segment()

    def paint(m):
        m[30:36, 10:16, 25:30] = True

    scene.edit(key, paint)
    edited = scene.read_segment(key).copy()
    submit(c, pt(1))
    c.wait()
    assert c.sync.uploads["segment"] == 2
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(1)], segment=edited))


def test_the_image_is_sent_again_only_after_it_changed(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    submit(c, pt(1))
    c.wait()
    assert c.sync.uploads["image"] == 1
    key = scene.selected_segment()
    edited = (image[::-1] + 7).astype(image.dtype)  # new voxel values in the same volume (e.g. a filter ran)
    scene.replace_image(edited)
    before = scene.read_segment(key).copy()
    submit(c, pt(2))
    c.wait()
    assert c.sync.uploads["image"] == 2 and c.events.errors == []
    assert np.array_equal(scene.read_segment(key), oracle(edited, [pt(2)], segment=before))


def test_removing_the_segment_drops_its_queued_prompts_and_keeps_the_others(Scene, make, image):
    seg = np.zeros(image.shape, bool)
    seg[5:10, 5:10, 5:10] = True
    scene = Scene(image, {"kept": seg})
    c = make(scene)
    scene.select_segment(None)
    submit(c, pt(0))
    key = scene.selected_segment()
    submit(c, pt(1))
    scene.remove_segment(key)  # while its prompts are queued or running
    c.wait()
    assert key not in scene.segment_keys() and c.events.errors == []
    assert np.array_equal(scene.read_segment("kept").astype(bool), seg)
    submit(c, pt(2))  # the next prompt makes a new segment
    c.wait()
    assert scene.selected_segment() not in (None, key, "kept") and scene.read_segment(scene.selected_segment()).any()


def test_reset_clears_segment_and_prompts(Scene, make, oracle, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    key = scene.selected_segment()
    c.toggle_positive()
    assert not c.positive
    submit(c, pt(1))  # negative, still running when reset comes
    c.reset_segment()
    assert c.positive and not scene.read_segment(key).any()
    c.wait()
    assert not scene.read_segment(key).any()  # the in-flight result was discarded
    submit(c, pt(2))
    c.wait()
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(2)]))


def test_masking_settings_are_honoured(Scene, make, oracle, image):
    locked = np.zeros(image.shape, bool)
    locked[:, :30, :] = True
    scene = Scene(image, {"locked": locked})
    scene.select_segment(None)
    scene.settings = M.MaskingSettings(M.EDIT_OUTSIDE_ALL, M.OVERWRITE_ALL)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    key = scene.selected_segment()
    assert key != "locked"
    full = oracle(image, [pt(0)]).astype(bool)
    assert full[:, :30].any() and full[:, 30:].any()
    got = scene.read_segment(key).astype(bool)
    assert np.array_equal(got, full & ~locked)
    assert np.array_equal(scene.read_segment("locked").astype(bool), locked)
    # Overwrite everywhere: the other segment loses what the prompt took.
    scene.settings = M.MaskingSettings(M.EDIT_EVERYWHERE, M.OVERWRITE_ALL)
    c.reset_segment()
    submit(c, pt(0))
    c.wait()
    assert np.array_equal(scene.read_segment(key).astype(bool), full)
    assert np.array_equal(scene.read_segment("locked").astype(bool), locked & ~full)
    # ... and undo gives it back.
    c.undo()
    c.wait()
    assert np.array_equal(scene.read_segment("locked").astype(bool), locked)


def test_recovers_when_the_server_forgot_the_session(Scene, make, oracle, server, image):
    scene = Scene(image)
    c = make(scene)
    submit(c, pt(0))
    c.wait()
    key = scene.selected_segment()
    before = scene.read_segment(key).copy()
    requests.post(server + "/release", headers={"X-Lease-Token": c.sync.session._lease_token})
    submit(c, pt(1))
    c.wait()
    assert c.events.errors == []
    assert c.sync.uploads == {"image": 2, "segment": 2}
    # The new session was given the segment and the earlier prompt again (a replay): the uninterrupted result.
    assert c.sync.replays == 1
    assert np.array_equal(scene.read_segment(key), oracle(image, [pt(0), pt(1)]))
    c.undo()
    c.wait()
    assert np.array_equal(scene.read_segment(key), before)


def test_unreachable_server_reports_and_keeps_the_segment(Scene, make, image):
    seg = np.zeros(image.shape, bool)
    seg[5:10, 5:10, 5:10] = True
    scene = Scene(image, {"mine": seg})
    scene.select_segment("mine")
    c = make(scene, url="http://127.0.0.1:%d" % free_port())
    submit(c, pt(0))
    submit(c, pt(1))
    c.wait()
    assert len(c.events.errors) == 1
    exc, job, dropped = c.events.errors[0]
    assert isinstance(exc, ServerUnreachableError) and dropped == 1
    assert "Cannot reach" in str(exc) or "connect" in str(exc)
    assert np.array_equal(scene.read_segment("mine").astype(bool), seg)
    assert not c.busy


def test_the_caller_thread_never_waits(Scene, make, image):
    scene = Scene(image)
    c = make(scene)
    main = threading.current_thread()
    seen = []
    original = scene.merge

    def merge(*a, **k):
        seen.append(threading.current_thread() is main)
        return original(*a, **k)

    scene.merge = merge
    submit(c, pt(0))
    submit(c, pt(1))
    assert c.pending == 2  # submit returned at once
    c.wait()
    assert seen == [True, True]  # scene writes on the caller's thread only


def test_timing_run_reports_every_prompt_type(Scene, server):
    from SlicerNNInteractiveLib import timing

    def make_controller(scene):
        c = Controller(scene, lambda: RemoteSession(server))
        c.last_errors = []
        c.on_error = lambda exc, job, dropped: c.last_errors.append(exc)
        return c

    records = timing.run(Scene, make_controller, sizes=("S",), reps=2, log=lambda m: None)
    summary = timing.summarize(records)
    assert sorted(k for _, k in summary) == sorted(timing.KINDS + ("upload",))
    for kind in timing.KINDS:
        row = summary[("S", kind)]
        assert row["total_ms"][2] == 2 and row["total_ms"][0] > 0
    assert "upload_image_ms" in summary[("S", "upload")]
    text = timing.format_summary(summary)
    assert "scribble" in text and "+-" in text
    # the prompts are well-formed for every size
    for size, shape in timing.SIZES.items():
        prompts = timing.prompts_for(shape)
        assert prompts["scribble"]["mask"].shape == tuple(hi - lo for lo, hi in prompts["scribble"]["interaction_bbox"])
        assert prompts["lasso"]["mask"].sum() > prompts["scribble"]["mask"].sum()


def test_every_write_is_announced_first_and_disconnect_claims_anew(Scene, server, image):
    """before_write runs before each change of a segment (a result, an undo, a reset) with the segment as it was,
    so the Segment Editor can save its undo state there; disconnect releases the session and the next prompt
    claims a new one and sends the image again."""
    scene = Scene(image)
    seen = []
    c = Controller(scene, lambda: RemoteSession(server),
                   before_write=lambda key: seen.append((key, scene.read_segment(key).copy())))
    try:
        submit(c, pt(0))
        c.wait()
        key = scene.selected_segment()
        assert len(seen) == 1 and seen[0][0] == key and not seen[0][1].any()  # announced while still empty
        after = scene.read_segment(key).copy()
        assert after.any() and c.undo()
        c.wait()
        assert len(seen) == 2 and np.array_equal(seen[1][1], after)
        submit(c, pt(1))
        c.wait()
        c.reset_segment()
        c.wait()
        assert len(seen) == 4 and seen[3][1].any() and not scene.read_segment(key).any()
        lease = c.sync.session._lease_token
        c.disconnect()
        assert not c.sync.connected and not c.can_undo()
        submit(c, pt(2))
        c.wait()
        assert c.sync.session._lease_token != lease and c.sync.uploads["image"] == 1  # the new session's upload
    finally:
        c.close()
