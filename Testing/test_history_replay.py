"""Replay to the same state: whenever a server's session is lost (a released lease, a killed backend behind HAProxy,
Slicer closed and the scene reopened), the next prompt's mask is voxel-identical to the one an uninterrupted session
gives. The reference is an in-process ``nnInteractiveInferenceSession`` given the same image, the same starting
segment and the same prompts, never interrupted.

Models with which predictions matter: the trained blob model (autozoom on, as our server runs it by default) on our
servers, the speckle model (autozoom off) on the official server. Negative controls show that the prompt sequence is
sensitive to what the session remembers: re-sending the segment alone (the recovery before histories), or replaying
with a prediction for the last prompt only, gives another mask.
"""

import os
import signal
import tempfile
import zipfile

import numpy as np
import pytest
import requests
import torch

from conftest import official_server
from haproxy_rig import balancer, haproxy_binary, our_servers
from phantoms import box_2d, interior_voxel, lasso_2d, make_phantom, random_interior_voxel, scribble_2d
from test_equivalence import local_session as equivalence_session

from SlicerNNInteractiveLib import history as H
from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.history import HistoryError, PromptHistory, Step
from SlicerNNInteractiveLib.rasterize import crop_to_bbox
from SlicerNNInteractiveLib.scene import ArrayScene
from SlicerNNInteractiveLib.sync import SyncedSession

COOKIE = "NNISERVER"  # the stickiness cookie of the shipped HAProxy configuration


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=101)  # 64^3, four blobs the model never saw in training


def cropped(mask):
    crop, box = crop_to_bbox(mask)
    return {"mask": crop, "interaction_bbox": box}


@pytest.fixture(scope="module")
def prompts(phantom):
    """Six prompts of every kind on four blobs, each as SyncedSession.prompt takes it: (kind, args, positive)."""
    labels, rng = phantom.labels, np.random.RandomState(0)
    return [("point", {"coordinates": interior_voxel(labels, 1)}, True),
            ("bbox", {"bbox": box_2d(labels, 2)}, True),
            ("scribble", cropped(scribble_2d(labels, 3)), True),
            ("point", {"coordinates": random_interior_voxel(labels, 2, rng)}, False),
            ("lasso", cropped(lasso_2d(labels, 4)), True),
            ("point", {"coordinates": random_interior_voxel(labels, 3, rng)}, False)]


@pytest.fixture(scope="module")
def start(phantom):
    """A segment drawn by hand before the first prompt (sent as the initial segmentation)."""
    seg = np.zeros(phantom.image.shape, np.uint8)
    seg[2:8, 2:8, 2:8] = 1
    return seg


def local_session(model, autozoom, image, segment=None):
    """An in-process session on ``image`` and its target buffer; ``segment``, when given, as the initial
    segmentation (without a prediction)."""
    s = equivalence_session(model, autozoom=autozoom)
    s.set_image(image[None])
    buf = np.zeros(image.shape, np.uint8)
    s.set_target_buffer(buf)
    if segment is not None:
        s.add_initial_seg_interaction(segment.copy(), run_prediction=False)
    return s, buf


def steps(prompts):
    return [Step.from_args(kind, args, positive, (64, 64, 64)) for kind, args, positive in prompts]


def uninterrupted(model, autozoom, image, start, prompts, undo_after=None):
    """The reference: the masks after each prompt of one in-process session (with ``undo()`` after prompt number
    ``undo_after``, when given)."""
    s, buf = local_session(model, autozoom, image, start)
    masks = []
    for n, step in enumerate(steps(prompts)):
        step.send(s, True)
        masks.append(buf.copy())
        if n == undo_after:
            assert s.undo()
    return masks, s


@pytest.fixture(scope="module")
def blob_reference(blob_model, phantom, start, prompts):
    return uninterrupted(blob_model, True, phantom.image, start, prompts)[0]


# ---------------------------------------------------------------- servers: two of ours (blobs), the official one


@pytest.fixture(scope="module")
def backends(blob_model, tmp_path_factory):
    with our_servers(blob_model, tmp_path_factory.mktemp("history"), 2, "--max-sessions", "6") as backends:
        yield backends


@pytest.fixture(scope="module")
def ours(backends):
    return backends[0].url


@pytest.fixture(scope="module")
def official(speckle_model, tmp_path_factory):
    with official_server(speckle_model, tmp_path_factory.mktemp("history-official"), "--no-autozoom") as (url, _):
        yield url


def release(url, session):
    """The server forgets the session (as after its idle timeout or a restart)."""
    requests.post(url + "/release", headers={"X-Lease-Token": session._lease_token}).raise_for_status()


# ---------------------------------------------------------------- the proof, in process


def test_the_fast_and_full_replays_rebuild_the_uninterrupted_state(blob_model, phantom, start, prompts,
                                                                   blob_reference):
    """FAST (the segment, then the prompts without predictions) and FULL (the base, then every prompt predicted)
    give the next prompt's mask voxel for voxel, and FAST the very same interaction channels and intensity; the
    segment alone, or a prediction for the last prompt only, do not (so this comparison can fail)."""
    image = phantom.image
    history = PromptHistory.start(image.shape, start)
    for step in steps(prompts[:-1]):
        history.add(step)
    history = PromptHistory.from_json(history.to_json())  # what is replayed is what was saved
    nxt = steps(prompts[-1:])[0]
    _, live = uninterrupted(blob_model, True, image, start, prompts[:-1])
    before = blob_reference[-2]

    def after(mode):
        s, buf = local_session(blob_model, True, image)
        report = H.replay(history, s, segment=before.copy(), mode=mode)
        return s, buf, report

    s, buf, report = after(H.FAST)
    assert report["predictions"] == 0 and report["prompts"] == len(prompts) - 1
    assert np.array_equal(buf, before)
    assert s.current_interaction_intensity == live.current_interaction_intensity
    assert torch.equal(torch.as_tensor(np.asarray(s.interactions[:])), torch.as_tensor(np.asarray(live.interactions[:])))
    nxt.send(s, True)
    assert np.array_equal(buf, blob_reference[-1]), "%d voxels differ" % (buf != blob_reference[-1]).sum()

    s, buf, report = after(H.FULL)
    assert report["predictions"] == len(prompts) - 1 and np.array_equal(buf, before)
    nxt.send(s, True)
    assert np.array_equal(buf, blob_reference[-1])

    s, buf, _ = after(H.LAST)
    nxt.send(s, True)
    assert (buf != blob_reference[-1]).sum() > 100  # the previous prediction channel held the base, not the segment

    s, buf = local_session(blob_model, True, image, before)  # the recovery before histories: the segment alone
    nxt.send(s, True)
    assert (buf != blob_reference[-1]).sum() > 0


# ---------------------------------------------------------------- a lost session, on our server and the official one


@pytest.fixture(scope="module")
def speckle_reference(speckle_model, phantom, start, prompts):
    return uninterrupted(speckle_model, False, phantom.image, start, prompts)[0]


@pytest.mark.parametrize("side", ["ours", "official"])
def test_a_lost_session_continues_as_if_nothing_happened(side, request, phantom, start, prompts):
    url = request.getfixturevalue(side)
    reference = request.getfixturevalue("blob_reference" if side == "ours" else "speckle_reference")
    image, segment = phantom.image, start.copy()
    sync = SyncedSession(lambda: RemoteSession(url), histories={})
    try:
        for n, (kind, args, positive) in enumerate(prompts[:-1]):
            sync.prompt_and_apply(kind, args, image, segment, positive)
            assert np.array_equal(segment, reference[n]), "prompt %d: %d voxels differ" % (n, (segment != reference[n]).sum())
        release(url, sync.session)
        kind, args, positive = prompts[-1]
        result = sync.prompt_and_apply(kind, args, image, segment, positive)
    finally:
        sync.close()
    assert sync.recoveries == 1 and result.timings["recovered"]
    assert sync.replays == 1 and sync.last_replay["mode"] == H.FAST and sync.last_replay["predictions"] == 0
    assert sync.last_replay["prompts"] == len(prompts) - 1
    assert np.array_equal(segment, reference[-1]), "%d voxels differ" % (segment != reference[-1]).sum()
    assert sync.uploads == {"image": 2, "segment": 2}
    who = sync.histories[None].servers
    assert who and who[0]["url"] == url and who[0]["version"]
    assert ("blobs" in who[0]["model"]) if side == "ours" else (who[0]["model"] is None)  # the official: no /x/info


def test_results_cut_by_masking_are_rebuilt_on_replay(ours, phantom, start, prompts, blob_reference):
    """Results written under masking leave the segment unlike the server's buffer: the history kept the server's
    regions, so the replay rebuilds that buffer without predictions, and the server's state is still the
    uninterrupted one (its next raw result shows it)."""
    image, segment = phantom.image, start.copy()
    forbidden = np.zeros(image.shape, bool)
    forbidden[:, :32] = True  # an editable area, say: nothing is written on this side

    def write(seg, slices, region):
        seg[slices] = np.where(forbidden[slices], seg[slices], region)

    sync = SyncedSession(lambda: RemoteSession(ours), histories={})
    try:
        for kind, args, positive in prompts[:-1]:
            sync.prompt_and_apply(kind, args, image, segment, positive, write=write)
        assert not sync.histories[None].exact
        release(ours, sync.session)
        kind, args, positive = prompts[-1]
        result = sync.prompt(kind, args, image, segment, positive)
    finally:
        sync.close()
    assert sync.replays == 1 and sync.last_replay["mode"] == H.FAST and sync.last_replay["predictions"] == 0
    assert not np.array_equal(segment, blob_reference[-2])  # the masking did cut something
    assert np.array_equal(result.region, blob_reference[-1][result.slices])


def test_a_history_too_long_is_dropped_and_the_segment_alone_is_sent(ours, phantom, start, prompts, monkeypatch):
    monkeypatch.setattr(H, "MAX_STEPS", 2)
    image, segment = phantom.image, start.copy()
    sync = SyncedSession(lambda: RemoteSession(ours), histories={})
    try:
        for kind, args, positive in prompts[:3]:
            sync.prompt_and_apply(kind, args, image, segment, positive)
        assert None not in sync.histories  # the third prompt did not fit: no history is kept rather than a wrong one
        release(ours, sync.session)
        sync.prompt_and_apply(*prompts[3][:2], image=image, segment=segment, positive=prompts[3][2])
    finally:
        sync.close()
    assert sync.recoveries == 1 and sync.replays == 0 and sync.uploads["segment"] == 2


# ---------------------------------------------------------------- the controller: undo across a recovery


def drawn_controller(url, image, start, **callbacks):
    """A scene with the segment "drawn" (``start``) selected, a Controller on it, and the errors it reports."""
    scene = ArrayScene(image, {"drawn": start})
    scene.select_segment("drawn")
    errors = []
    c = Controller(scene, lambda: RemoteSession(url), on_error=lambda exc, job, n: errors.append(exc), **callbacks)
    return scene, c, errors


def submit_all(c, prompts):
    for kind, args, positive in prompts:
        c.submit(kind, args, positive=positive)
    c.wait()


def test_undo_across_a_recovery_and_beyond_the_server_s_one_level(ours, blob_model, phantom, start, prompts):
    image = phantom.image
    scene, c, errors = drawn_controller(ours, image, start)
    try:
        submit_all(c, prompts[:3])
        release(ours, c.sync.session)
        assert c.undo()  # the third prompt, on a session the server has forgotten
        c.wait()
        submit_all(c, prompts[3:4])
        reference = uninterrupted(blob_model, True, image, start, prompts[:4], undo_after=2)[0]
        got = scene.read_segment("drawn")
        assert np.array_equal(got, reference[-1]), "%d voxels differ" % (got != reference[-1]).sum()
        assert c.sync.recoveries == 1 and c.sync.replays == 1 and c.sync.last_replay["prompts"] == 2
        # Two undos in a row: the server keeps one level, the history all of them.
        assert c.undo() and c.undo()
        c.wait()
        submit_all(c, prompts[4:5])
        reference = uninterrupted(blob_model, True, image, start, [prompts[0], prompts[4]])[0]
        got = scene.read_segment("drawn")
        assert np.array_equal(got, reference[-1]), "%d voxels differ" % (got != reference[-1]).sum()
        assert [s.kind for s in c.histories["drawn"].steps] == [prompts[0][0], prompts[4][0]]
    finally:
        c.close()
    assert not errors, errors


# ---------------------------------------------------------------- Run automatically off: prompts collected, one Run


@pytest.mark.parametrize("lost", ["while collecting", "just before Run"])
def test_collected_prompts_and_their_run_survive_a_lost_session(lost, ours, blob_model, phantom, start, prompts):
    """With "Run automatically" off (issue 17) prompts are added without a prediction and one Run predicts with all of
    them; the Run's result belongs to the last prompt collected (sync._record_prediction). A session lost while
    prompts are being collected, or after the last one and before Run, is rebuilt from the history (the prompts the
    server forgot are in it): the Run, and the prompt after it, give the masks of an uninterrupted session."""
    image = phantom.image
    scene, c, errors = drawn_controller(ours, image, start)
    try:
        submit_all(c, prompts[:2])
        c.auto_run = False
        submit_all(c, prompts[2:4])
        if lost == "while collecting":
            release(ours, c.sync.session)
        submit_all(c, prompts[4:5])
        if lost == "just before Run":
            release(ours, c.sync.session)
        c.predict()
        c.wait()
        assert not errors, errors
        after_run = scene.read_segment("drawn").copy()
        c.auto_run = True
        submit_all(c, prompts[5:6])
        after_next = scene.read_segment("drawn").copy()
        assert c.sync.recoveries == 1 and c.sync.replays == 1 and c.sync.last_replay["predictions"] == 0
        assert c.sync.last_replay["prompts"] == (4 if lost == "while collecting" else 5)
        assert [s.written is not None for s in c.histories["drawn"].steps] == [True, True, False, False, True, True]
    finally:
        c.close()
    assert not errors, errors
    s, buf = local_session(blob_model, True, image, start)  # the uninterrupted session: the same prompts, the same Run
    for n, step in enumerate(steps(prompts[:5])):
        step.send(s, n < 2)
    assert s._predict() is not None
    assert np.array_equal(after_run, buf), "the Run: %d voxels differ" % (after_run != buf).sum()
    steps(prompts[5:6])[0].send(s, True)
    assert np.array_equal(after_next, buf), "the prompt after it: %d voxels differ" % (after_next != buf).sum()


def test_undoing_a_run_keeps_the_prompts_it_ran_on(ours, blob_model, phantom, start, prompts):
    """Ctrl+Z after a Run undoes the prediction, not the last prompt collected: the server keeps the prompts (its undo
    restores the state before the Run), so the history must too. A Run after a lost session then gives the first Run's
    mask again, as in the uninterrupted session."""
    image = phantom.image
    scene, c, errors = drawn_controller(ours, image, start)
    try:
        submit_all(c, prompts[:1])
        after_first = scene.read_segment("drawn").copy()
        c.auto_run = False
        submit_all(c, prompts[1:3])
        c.predict()
        c.wait()
        first_run = scene.read_segment("drawn").copy()
        assert c.undo()
        c.wait()
        assert np.array_equal(scene.read_segment("drawn"), after_first)
        assert [s.written is not None for s in c.histories["drawn"].steps] == [True, False, False]
        release(ours, c.sync.session)
        c.predict()
        c.wait()
        again = scene.read_segment("drawn").copy()
        assert c.sync.replays == 1 and c.sync.last_replay["prompts"] == 3
    finally:
        c.close()
    assert not errors, errors
    s, buf = local_session(blob_model, True, image, start)
    for n, step in enumerate(steps(prompts[:3])):
        step.send(s, n < 1)
    s._predict()
    assert np.array_equal(first_run, buf) and not np.array_equal(first_run, after_first)
    assert np.array_equal(again, buf), "%d voxels differ" % (again != buf).sum()


def test_without_a_history_collected_prompts_lost_before_run_must_be_placed_again(ours, phantom, start, prompts):
    from SlicerNNInteractiveLib.errors import SessionExpiredError

    image, segment = phantom.image, start.copy()
    sync = SyncedSession(lambda: RemoteSession(ours))  # no histories: nothing can rebuild them
    try:
        kind, args, positive = prompts[0]
        sync.prompt(kind, args, image, segment, positive, run_prediction=False)
        release(ours, sync.session)
        with pytest.raises(SessionExpiredError, match="place them again"):
            sync.predict(image, segment)
        assert not sync.connected and sync.recoveries == 1
    finally:
        sync.close()


# ---------------------------------------------------------------- the scene saved as .mrb and reopened


def oblique():
    from test_scene_geometry import affine, rotation

    return affine(rotation(2, 20) @ rotation(1, 15) @ np.diag([0.8, 1.2, 2.0]), [-31.5, 12.25, 7.0])


def save_mrb(mrml, path):
    """What Slicer's "Save" does for a .mrb: the scene and its data in a folder, zipped."""
    folder = tempfile.mkdtemp(dir=os.path.dirname(path))
    assert mrml._keep[0].SaveSceneToSlicerDataBundleDirectory(folder, None)
    with zipfile.ZipFile(path, "w") as z:
        for root, _, files in os.walk(folder):
            for name in files:
                full = os.path.join(root, name)
                z.write(full, os.path.relpath(full, os.path.dirname(folder)))


def open_mrb(path):
    """A new MRML scene with the .mrb's nodes; the Scene of its Segment Editor node."""
    import slicer
    from mrml import new_mrml_scene

    from SlicerNNInteractiveLib.slicerscene import SlicerScene

    mrml = new_mrml_scene()
    assert mrml._keep[0].OpenSlicerDataBundle(path, tempfile.mkdtemp(dir=os.path.dirname(path)))
    editor = mrml.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
    assert isinstance(editor, slicer.vtkMRMLSegmentEditorNode) and editor.GetSegmentationNode() is not None
    return mrml, SlicerScene(editor)


@pytest.fixture(scope="module")
def saved_scene(ours, phantom, start, prompts, tmp_path_factory):
    """A rotated, anisotropic volume on real MRML nodes, three prompts on its segment, saved as a .mrb."""
    from mrml import MrmlScene

    scene = MrmlScene(phantom.image, {"drawn": start}, ijk_to_ras=oblique())
    scene.select_segment("drawn")
    c = Controller(scene, lambda: RemoteSession(ours))
    try:
        submit_all(c, prompts[:3])
    finally:
        c.close()
    text = scene.stored_history("drawn")
    assert text and PromptHistory.from_json(text).summary()["prompts"] == 3
    path = str(tmp_path_factory.mktemp("mrb") / "scene.mrb")
    save_mrb(scene.mrml, path)
    return path, scene.read_segment("drawn").copy()


def test_a_reopened_scene_continues_where_it_stopped(saved_scene, ours, prompts, blob_reference):
    path, saved = saved_scene
    mrml, scene = open_mrb(path)
    assert np.array_equal(scene.read_segment("drawn"), saved)
    assert np.allclose(scene.ijk_to_ras(), oblique(), atol=1e-6)
    c = Controller(scene, lambda: RemoteSession(ours))
    try:
        summary, why = c.stored_history()
        assert why is None and summary["prompts"] == 3 and summary["kinds"] == {"point": 1, "bbox": 1, "scribble": 1}
        c.continue_segment()
        submit_all(c, prompts[3:4])
        assert c.sync.replays == 1 and c.sync.last_replay["mode"] == H.FAST
    finally:
        c.close()
    got = scene.read_segment("drawn")
    assert np.array_equal(got, blob_reference[3]), "%d voxels differ" % (got != blob_reference[3]).sum()
    assert PromptHistory.from_json(scene.stored_history("drawn")).summary()["prompts"] == 4


def test_a_reopened_segment_edited_since_or_a_corrupt_history_is_reported_and_ignored(saved_scene, ours, phantom):
    from mrml import write_segment

    from SlicerNNInteractiveLib.slicerscene import historyAttributeName

    path, saved = saved_scene
    mrml, scene = open_mrb(path)
    node = scene.segmentationNode()
    c = Controller(scene, lambda: RemoteSession(ours))
    try:
        text = node.GetAttribute(historyAttributeName("drawn"))
        node.SetAttribute(historyAttributeName("drawn"), text[: len(text) // 2])
        assert "not valid JSON" in c.stored_history()[1]
        node.SetAttribute(historyAttributeName("drawn"), text)
        edited = saved.copy()
        edited[40:44, 40:44, 40:44] = 1
        write_segment(node, "drawn", edited, scene.volumeNode())
        summary, why = c.stored_history()
        assert summary is None and "changed after its last prompt" in why
        with pytest.raises(HistoryError, match="changed after its last prompt"):
            c.continue_segment()
        c.submit("point", {"coordinates": interior_voxel(phantom.labels, 1)}, positive=True)
        c.wait()
        assert c.sync.replays == 0 and c.sync.uploads["segment"] == 1  # a fresh start from the edited segment
        assert PromptHistory.from_json(scene.stored_history("drawn")).summary()["prompts"] == 1
    finally:
        c.close()


# ---------------------------------------------------------------- the same prompts on another model and server


def test_replay_on_another_model_and_server(ours, official, speckle_reference, phantom, start, prompts):
    """A segment's prompts, made with the blob model on our server, replayed on the official server with the speckle
    model: the new segment is what that model makes of them; the user's segment and selection are untouched."""
    results = []
    scene, c, errors = drawn_controller(ours, phantom.image, start,
                                        on_result=lambda job, r, t: results.append((job, r)))
    try:
        submit_all(c, prompts[:4])
        mine = scene.read_segment("drawn").copy()
        job = c.replay_elsewhere(lambda: RemoteSession(official), label="speckle")
        c.wait()
    finally:
        c.close()
    assert not errors, errors
    new, mask, report = [r for j, r in results if j is job][0]
    assert report["prompts"] == 4 and report["predictions"] == 4 and report["url"] == official
    assert scene.selected_segment() == "drawn" and new == "Segment_1" and scene.names[new] == "drawn on speckle"
    assert np.array_equal(scene.read_segment("drawn"), mine)
    expected = speckle_reference[3]  # the speckle model, given the same start and prompts
    assert np.array_equal(mask, expected) and np.array_equal(scene.read_segment(new), expected)
    assert not np.array_equal(expected, mine)


# ---------------------------------------------------------------- a killed backend behind HAProxy (kills one: last)


def test_a_killed_backend_behind_haproxy_is_replaced_as_if_nothing_happened(backends, phantom, start, prompts,
                                                                            blob_reference, tmp_path_factory):
    if haproxy_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is not installed, and CI=true: .ci/run installs it (apt-get install -y haproxy)")
        pytest.skip("haproxy is not installed (Debian/Ubuntu: apt-get install -y haproxy; .ci/run installs it)")
    image, segment = phantom.image, start.copy()
    with balancer(backends, tmp_path_factory.mktemp("history-lb")) as lb:
        made = []

        def connect():
            made.append(RemoteSession(lb.url))
            return made[-1]

        sync = SyncedSession(connect, histories={})
        try:
            for kind, args, positive in prompts[:-1]:
                sync.prompt_and_apply(kind, args, image, segment, positive)
            holder = made[0]._http._session.cookies.get(COOKIE)
            victim = [b for b in backends if b.name == holder][0]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(30)
            kind, args, positive = prompts[-1]
            sync.prompt_and_apply(kind, args, image, segment, positive)
        finally:
            sync.close()
    assert sync.recoveries == 1 and sync.replays == 1 and sync.last_replay["prompts"] == len(prompts) - 1
    assert made[-1]._http._session.cookies.get(COOKIE) not in (None, holder)  # continued on the other server
    assert np.array_equal(segment, blob_reference[-1]), "%d voxels differ" % (segment != blob_reference[-1]).sum()
