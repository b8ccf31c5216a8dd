"""The module's Prompt history section, run for real (Testing/slicerapp, our server, the trained blob model): a scene
saved as .mrb, cleared and opened again continues where its segment stopped; saved prompts that cannot be used are
reported once and never applied; Ctrl+Z across a lost session; "Replay on another model or server" into a new segment,
with its consent, cancel and errors.

The reference for "the same mask" is one uninterrupted session on the same server given the same prompts (the
prompts as the module's history recorded them, in voxels), never lost, never reloaded.
"""

import numpy as np
import requests
import slicer

from conftest import free_port
from phantoms import interior_voxel, random_interior_voxel
from test_slicer_widget import module, phantom, server, world  # noqa: F401 (the fixtures: the module on our server)

from SlicerNNInteractiveLib.client import RemoteSession


def clicks(phantom):
    """Where the user clicks, in voxels (k, j, i), with the polarity: blobs 1 and 2, a negative point in 2, blob 3."""
    rng = np.random.RandomState(0)
    labels = phantom.labels
    return [(interior_voxel(labels, 1), True), (interior_voxel(labels, 2), True),
            (random_interior_voxel(labels, 2, rng), False), (random_interior_voxel(labels, 3, rng), True)]


def click(m, voxel, positive):
    w = m.widget
    if w.isPositive() != positive:
        m.app.press("T")
    if w.tools.active != "point":
        m.app.press("P")
    m.app.place_point(w.prompts.points(positive), world(voxel))
    m.idle()
    assert m.errors() == []


def recorded(m):
    """The selected segment's prompts as the module's history holds them (each a history.Step, in voxels)."""
    w = m.widget
    return list(w.controller.histories[w.getScene().selected_segment()].steps)


def uninterrupted(url, image, steps, undo_after=None):
    """The masks after each prompt of one session on ``url`` that nothing interrupts (from an empty segment, as the
    module's first prompt on one), with an undo after prompt number ``undo_after``."""
    session = RemoteSession(url)
    try:
        session.set_image(image[None])
        buf = np.zeros(image.shape, np.uint8)
        session.set_target_buffer(buf)
        masks = []
        for n, step in enumerate(steps):
            step.send(session, True)
            masks.append(buf.astype(bool))
            if n == undo_after:
                assert session.undo()
        return masks
    finally:
        session.close()


def alone(url, image, segment, step):
    """The mask a fresh session gives for ``step`` when it gets ``segment`` alone (the recovery before histories)."""
    session = RemoteSession(url)
    try:
        session.set_image(image[None])
        buf = np.zeros(image.shape, np.uint8)
        session.set_target_buffer(buf)
        session.add_initial_seg_interaction(segment.astype(np.uint8), run_prediction=False)
        step.send(session, True)
        return buf.astype(bool)
    finally:
        session.close()


def statuses(w):
    """Every status line from now on."""
    seen = []
    shown = w.messages.status
    w.messages.status = lambda text: (seen.append(text), shown(text))
    return seen


def reopen(m, tmp_path):
    """File > Save as .mrb, close the scene, open the file again."""
    path = str(tmp_path / "scene.mrb")
    m.app.save_scene(path)
    slicer.mrmlScene.Clear(0)
    assert m.widget.controller is None  # closing the scene ended the session and forgot what it knew
    m.app.load_scene(path)


def test_a_saved_scene_reopened_continues_where_its_segment_stopped(module, server, phantom, tmp_path):
    m, w = module, module.widget
    image = phantom.image.astype(np.int16)
    for voxel, positive in clicks(phantom)[:3]:
        click(m, voxel, positive)
    steps = recorded(m)
    assert "3 prompts since its last reset (3 points)" in w.ui.historyLabel.text
    assert w.ui.replayButton.enabled and not w.ui.continueButton.visible
    saved = m.segment()
    reopen(m, tmp_path)
    key = w.getScene().selected_segment()
    assert np.array_equal(m.segment(), saved)
    assert "has 3 prompts saved with the scene (3 points; answered by blobs at 127.0.0.1" in w.ui.historyLabel.text
    assert w.ui.continueButton.visible and w.ui.continueButton.enabled and not w.ui.replayButton.enabled
    shown = statuses(w)
    m.app.click(w.ui.continueButton)
    assert shown[-1].startswith("Continuing Segment_1 from its 3 saved prompts (3 points)")
    assert not w.ui.continueButton.visible and w.ui.replayButton.enabled
    assert "3 prompts since its last reset" in w.ui.historyLabel.text
    voxel, positive = clicks(phantom)[3]
    click(m, voxel, positive)
    sync = w.controller.sync
    assert sync.replays == 1 and sync.last_replay["mode"] == "fast" and sync.last_replay["prompts"] == 3
    steps.append(recorded(m)[-1])
    expected = uninterrupted(server, image, steps)[-1]
    got = m.segment()
    assert np.array_equal(got, expected), "%d voxels differ" % (got != expected).sum()
    assert not np.array_equal(alone(server, image, saved, steps[-1]), expected)  # the comparison can fail
    assert w.getScene().selected_segment() == key and "4 prompts" in w.ui.historyLabel.text


def test_saved_prompts_that_cannot_be_used_are_reported_once_and_never_applied(module, server, phantom, tmp_path):
    from mrml import write_segment

    from SlicerNNInteractiveLib.slicerscene import historyAttributeName

    m, w = module, module.widget
    for voxel, positive in clicks(phantom)[:2]:
        click(m, voxel, positive)
    reopen(m, tmp_path)
    scene = w.getScene()
    key = scene.selected_segment()
    node, attribute = scene.segmentationNode(), historyAttributeName(key)
    text = node.GetAttribute(attribute)
    shown = statuses(w)

    def select_again():  # what the user does to look at it: another segment, then this one
        other = scene.add_segment()
        scene.select_segment(key)
        scene.segmentation().RemoveSegment(other)
        m.app.pump(0.05)

    damaged = [("not valid JSON", text[: len(text) // 2]),
               ("recorded on another image", text.replace('"image":"', '"image":"0', 1)),
               ("format version 99", text.replace('"version":1', '"version":99', 1))]
    for why, bad in damaged:
        node.SetAttribute(attribute, bad)
        select_again()
        select_again()
        reports = [s for s in shown if why in s]
        assert len(reports) == 1 and reports[0].startswith("The saved prompts of Segment_1 are not used"), shown
        assert why in w.ui.historyLabel.text and "starts afresh" in w.ui.historyLabel.text
        assert not w.ui.continueButton.visible and not w.ui.replayButton.enabled
    node.SetAttribute(attribute, text)
    edited = m.segment().copy()
    edited[2:6, 2:6, 2:6] = True  # a hand edit after the last prompt: the prompts no longer describe the segment
    write_segment(node, key, edited, m.volume)
    m.app.pump(0.05)
    select_again()
    assert "changed after its last prompt" in w.ui.historyLabel.text and not w.ui.continueButton.visible
    w.history.onContinue()  # even asked directly, nothing of it is applied
    assert "changed after its last prompt" in m.errors()[-1] and key not in w.controller.histories
    m.app.dialogs.shown.clear()
    click(m, *clicks(phantom)[2])
    sync = w.controller.sync
    assert sync.replays == 0 and sync.uploads["segment"] == 1  # a fresh start from the segment as it is
    assert "1 prompt since its last reset" in w.ui.historyLabel.text


def release(url, controller):
    """The server forgets the module's session (as after its idle timeout or a restart): the module does not know."""
    token = controller.sync.session._lease_token
    requests.post(url + "/release", headers={"X-Lease-Token": token}).raise_for_status()


def test_ctrl_z_across_a_lost_session(module, server, phantom):
    m, w = module, module.widget
    image = phantom.image.astype(np.int16)
    masks = []
    for voxel, positive in clicks(phantom)[:3]:
        click(m, voxel, positive)
        masks.append(m.segment())
    steps = recorded(m)
    release(server, w.controller)
    m.app.press("Ctrl+Z")
    m.idle()
    assert np.array_equal(m.segment(), masks[1]) and m.errors() == []
    assert len(recorded(m)) == 2
    click(m, *clicks(phantom)[3])
    sync = w.controller.sync
    assert sync.recoveries == 1 and sync.replays == 1 and sync.last_replay["prompts"] == 2
    expected = uninterrupted(server, image, steps + recorded(m)[-1:], undo_after=2)[-1]
    got = m.segment()
    assert np.array_equal(got, expected), "%d voxels differ" % (got != expected).sum()


def replay_to(app, url, key="", label=""):
    """Answer the replay dialog: this URL, key and name, then OK."""
    from PySide6 import QtWidgets

    def fill(dialog):
        dialog.findChild(QtWidgets.QComboBox, "replayUrlComboBox").setEditText(url)
        dialog.findChild(QtWidgets.QLineEdit, "replayApiKeyLineEdit").setText(key)
        dialog.findChild(QtWidgets.QLineEdit, "replayLabelLineEdit").setText(label)
        app.dialogs.dialog_result = lambda dialog: QtWidgets.QDialog.Rejected
        return QtWidgets.QDialog.Accepted

    app.dialogs.dialog_result = fill


def test_replay_on_another_server_adds_a_segment_to_compare(module, server, phantom):
    """The same prompts replayed, with predictions, through a second session (here the same model, so the new
    segment must equal the user's: a replay of a history from its start rebuilds the mask), named after the segment
    and the server's model; consent for a remote server, Cancel and errors as for other long actions."""
    m, w = module, module.widget
    for voxel, positive in clicks(phantom)[:3]:
        click(m, voxel, positive)
    scene = w.getScene()
    key, mine = scene.selected_segment(), m.segment()
    other = server.replace("127.0.0.1", "localhost")  # another URL: a session of its own
    # a remote server: consent is asked first; "No" sends nothing
    replay_to(m.app, "gpu-node.invalid:1527")
    m.app.dialogs.answers.append(False)
    m.app.click(w.ui.replayButton)
    assert "consent" in w.ui.statusLabel.text and scene.segment_keys() == [key]
    # Cancel: nothing is added
    replay_to(m.app, other)
    m.app.click(w.ui.replayButton)
    assert w.ui.cancelReplayButton.enabled and not w.ui.replayButton.enabled
    m.app.click(w.ui.cancelReplayButton)
    m.idle()
    assert "cancelled" in w.ui.statusLabel.text and scene.segment_keys() == [key] and m.errors() == []
    assert not w.ui.cancelReplayButton.enabled and w.ui.replayButton.enabled
    # a server that is not there: one readable error, nothing changed
    replay_to(m.app, "http://127.0.0.1:%d" % free_port())
    m.app.click(w.ui.replayButton)
    m.idle()
    assert len(m.errors()) == 1 and m.errors()[0].startswith("The replay on 127.0.0.1:") and "Cannot reach" in \
        m.errors()[0] and scene.segment_keys() == [key]
    m.app.dialogs.shown.clear()
    # the replay itself: progress on the status line, then a new segment beside the user's, who keeps prompting
    seen = statuses(w)
    replay_to(m.app, other)
    m.app.click(w.ui.replayButton)
    m.idle()
    assert m.errors() == [] and any(s.startswith("Replaying the prompts on localhost:") for s in seen)
    new = [k for k in scene.segment_keys() if k != key]
    assert len(new) == 1 and scene.selected_segment() == key
    name = scene.segment_name(new[0])
    assert name == "Segment_1 on blobs (%s)" % other.split("://")[1] and name in w.ui.statusLabel.text
    assert np.array_equal(scene.read_segment(new[0]).astype(bool), mine) and np.array_equal(m.segment(), mine)
    assert w.settings.replay_servers()[0] == other
    click(m, *clicks(phantom)[3])  # prompts still go to the user's segment
    assert not np.array_equal(m.segment(), mine) and scene.selected_segment() == key
    assert len(scene.segment_keys()) == 2
