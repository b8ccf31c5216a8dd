"""The module's decisions, without Qt or Slicer: prompt dispatch and failure policy (one failure, one message; points
never sent are removed), against a server port nothing listens on and a real server."""

import threading

import numpy as np
import pytest

from conftest import free_port, our_server

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.dispatch import Messages, PromptDispatch, failure_message
from SlicerNNInteractiveLib.errors import ServerUnreachableError
from SlicerNNInteractiveLib.scene import ArrayScene


@pytest.fixture(scope="module")
def server(quiet_model, tmp_path_factory):
    with our_server(quiet_model, tmp_path_factory.mktemp("policy"), "--no-autozoom", "--max-sessions", "2") as (url, _):
        yield url


def image():
    return np.random.default_rng(0).integers(0, 300, (24, 32, 32)).astype(np.int16)


def test_a_dialog_at_a_time_the_rest_to_the_status_line():
    shown, status = [], []

    def dialog(message, details):  # a modal dialog: the module's timer fires inside and another error comes
        shown.append(message)
        messages.error("second failure, while the first dialog is open")

    messages = Messages(dialog, status.append)
    messages.error("first failure\nmore")
    assert shown == ["first failure\nmore"] and messages.suppressed == 1
    assert status == ["first failure", "second failure, while the first dialog is open"]
    messages.error("later")
    assert shown[-1] == "later"  # the first dialog is closed: the next failure gets its own
    messages.dialog = None  # the self-test collects them instead
    messages.error("collected")
    assert messages.collected == ["collected"] and len(shown) == 2


def test_an_unreachable_server_is_one_message_and_every_prompt_behind_it_is_unsent():
    errors, unsent = [], []
    url = "http://127.0.0.1:%d" % free_port()
    controller = Controller(ArrayScene(image()), lambda: RemoteSession(url, connect_timeout=2),
                            on_error=lambda exc, job, dropped: errors.append((job.kind, dropped, exc)))
    dispatch = PromptDispatch(lambda: controller, lambda: None, Messages())
    try:
        for n in range(3):
            assert dispatch.send("point", {"coordinates": (5 + n, 5, 5)}, unsent=lambda n=n: unsent.append(n))
        controller.wait(30)
        [(kind, dropped, exc)] = errors
        assert kind == "connect" and dropped == 3 and isinstance(exc, ServerUnreachableError)
        assert sorted(unsent) == [0, 1, 2]
        assert "3 queued prompt(s) were not sent" in failure_message(exc, dropped)
    finally:
        controller.close()


def test_refused_prompts_are_unsent_and_the_user_is_told_once():
    messages, unsent = Messages(), []
    dispatch = PromptDispatch(lambda: pytest.fail("no controller for a refused prompt"),
                              lambda: "Not sent: sending images to X needs your consent.", messages)
    assert dispatch.send("point", {"coordinates": (1, 1, 1)}, unsent=lambda: unsent.append(1)) is None
    assert unsent == [1] and messages.last.startswith("Not sent") and messages.collected == []

    def broken():
        raise RuntimeError("The Python package blosc2 is needed; it was not installed.")

    dispatch.permission = broken
    assert dispatch.send("point", {"coordinates": (1, 1, 1)}, unsent=lambda: unsent.append(2)) is None
    assert unsent == [1, 2] and messages.collected == ["The Python package blosc2 is needed; it was not installed."]


def test_prompts_dropped_by_a_reset_or_a_disconnection_are_unsent_applied_ones_are_not(server):
    unsent, errors = [], []
    scene = ArrayScene(image())
    controller = Controller(scene, lambda: RemoteSession(server), on_error=lambda exc, job, dropped: errors.append(exc))
    try:
        controller.submit("point", {"coordinates": (5, 5, 5)}, unsent=lambda: unsent.append("applied"))
        controller.wait(60)
        controller.submit("point", {"coordinates": (6, 5, 5)}, unsent=lambda: unsent.append("in flight"))
        controller.submit("point", {"coordinates": (7, 5, 5)}, unsent=lambda: unsent.append("queued"))
        controller.reset_segment()  # the queued one is dropped at once, the one in flight when its result comes
        controller.wait(60)
        assert sorted(unsent) == ["in flight", "queued"] and errors == []
        controller.submit("point", {"coordinates": (8, 5, 5)}, unsent=lambda: unsent.append("disconnected"))
        controller.disconnect()
        assert unsent[-1] == "disconnected"
    finally:
        controller.close()


def test_the_automatic_section():
    from SlicerNNInteractiveLib.controller import Job
    from SlicerNNInteractiveLib.presenter import AutoPresenter, busy_text, queue_text, result_text

    auto = AutoPresenter()
    assert auto.items() == [] and auto.buttons(0, 0) == (False, False) and "Test connection" in auto.info(0)
    auto.listed([{"id": "a", "name": "Organs", "labels": [{"name": "liver"}], "license": "CC-BY"}, {"id": "b"}])
    assert auto.items() == [("Organs", "a"), ("b", "b")] and auto.info(0) == "Segments: liver. License: CC-BY"
    assert auto.buttons(0, 0) == (True, False) and auto.buttons(0, 1) == (False, True)  # one run at a time
    assert auto.buttons(5, 0) == (False, False)
    auto.forget()  # the server changed: its models are not the new server's
    assert auto.model(0) is None and auto.buttons(0, 0) == (False, False)
    auto.listed([])
    assert auto.info(0) == "This server runs no automatic models."
    run = Job("auto", label="Organs")
    assert busy_text(run, 3) == "Automatic segmentation with Organs..."  # what runs now, not "Segmenting..."
    assert busy_text(Job("point"), 3) == "Segmenting... (2 prompts queued)" and busy_text(None, 0) is None
    assert result_text(run, {"segments": ["s1", "s2"], "total_ms": 2500}).startswith("Organs: 2 segment(s) in 2.5 s")
    assert queue_text({"waiting": True, "ahead": 2, "expected_wait_seconds": 3.2}) == "Waiting for the GPU: 2 ahead (~3 s)"
    assert queue_text({"waiting": False}) is None


def test_one_polarity_for_the_controller_and_what_shows_it():
    from SlicerNNInteractiveLib.polarity import Polarity
    from SlicerNNInteractiveLib.presenter import tool_text

    shown = []
    polarity = Polarity(on_change=shown.append)
    controller = Controller(ArrayScene(image()), lambda: None, polarity=polarity)
    controller.toggle_positive()
    assert controller.positive is False and polarity.positive is False and shown == [False]
    controller.next_segment()  # a new segment: positive again, and whatever shows it hears so
    assert polarity.positive is True and shown == [False, True]
    polarity.set(False)
    assert controller.submit("point", {"coordinates": (1, 1, 1)}).positive is False
    controller.close()
    assert tool_text("point", False) == "Point tool armed (negative prompts)." and tool_text(None, True).startswith(
        "Prompts are positive")


def test_server_settings_and_consent():
    from SlicerNNInteractiveLib.settings import ServerSettings, describe, summary

    store = {}
    settings = ServerSettings(lambda name, default: store.get(name, default), store.__setitem__)
    assert settings.url == "http://127.0.0.1:1527" and settings.api_key is None and settings.ca_bundle is None
    assert settings.update("gpu-node:1527", " key ", "") == ("http://gpu-node:1527", True)
    assert settings.update("http://gpu-node:1527", "key", "") == ("http://gpu-node:1527", False)
    with pytest.raises(ValueError, match="http"):
        settings.update("ftp://x", "key", "")
    assert settings.url == "http://gpu-node:1527" and settings.api_key == "key"  # a bad URL stores nothing
    assert settings.consent_box("http://127.0.0.1:9") == (True, False, "The server is on this computer: nothing "
                                                                          "leaves it.")
    assert settings.consent_box("gpu-node:1527")[:2] == (False, True) and settings.consent_box("ftp://x")[:2] == (
        False, False)
    asked = []
    assert settings.refusal("http://gpu-node:1527", lambda q: asked.append(q) or False).startswith("Not sent")
    assert "gpu-node:1527" in asked[0] and settings.consented() == []
    assert settings.refusal("http://gpu-node:1527", lambda q: True) is None  # yes: kept
    assert settings.consented() == ["http://gpu-node:1527"] and settings.may_send("http://gpu-node:1527")
    store["ConsentedServers"] = "http://a:1"  # QSettings gives a one-item list back as a string
    assert settings.consented() == ["http://a:1"]
    settings.set_consent("a:1", False)
    assert settings.consented() == [] and settings.may_send("http://localhost:5") and not settings.may_send("http://b:1")
    assert summary("http://x:1", {"model": "M"}) == "Server: http://x:1 (M)" and summary("http://x:1") == "Server: http://x:1"
    text = describe({"version": "2.6.0", "supported_interactions": ["point"], "models": [{"id": "a"}]})
    assert text.startswith("Connected.") and "Prompts: point" in text and "Automatic models: a" in text


def test_status_texts_and_timing_report():
    from SlicerNNInteractiveLib.presenter import disarmed_text
    from SlicerNNInteractiveLib.timing import report

    assert disarmed_text("box", None) is None  # the user disarmed it: nothing to say
    assert disarmed_text("box", "Slicer's window/level mode was chosen") == (
        "Box tool disarmed: Slicer's window/level mode was chosen.")
    assert report([]) == "No prompt has run yet."
    text = report([{"kind": "point", "total_ms": 12.0, "prepare_ms": 0.1}])
    assert "Last prompts:" in text and "point:" in text


def test_prompts_added_without_a_prediction_say_so():
    from SlicerNNInteractiveLib.controller import Job
    from SlicerNNInteractiveLib.presenter import busy_text, result_text

    added = Job("point", positive=False)
    added.run = False
    assert result_text(added, {}) == "Negative point added: Run (N) predicts with every prompt added."
    assert result_text(Job("predict"), {"total_ms": 250, "server_total_ms": 200}) == "Run: 250 ms (server 200 ms)"
    assert busy_text(Job("predict"), 1) == "Segmenting..."


def test_the_prompt_history_section():
    """What the Prompt history section says and offers for the selected segment: nothing, saved prompts that can be
    continued (read and checked once while nothing changes), saved prompts that cannot be used (the reason, reported
    once per scene), prompts recorded in this session."""
    from SlicerNNInteractiveLib.history import PromptHistory, Step, image_digest, mask_digest
    from SlicerNNInteractiveLib.historyview import HistoryView, continued_text

    img = image()
    drawn = np.zeros(img.shape, np.uint8)
    drawn[4:9, 5:12, 6:14] = 1
    scene = ArrayScene(img, {"Segment_1": drawn, "Segment_2": drawn})
    controller = Controller(scene, lambda: None)  # never connects: nothing here needs a server
    view = HistoryView()
    assert view.state(None).text == ""  # no volume or segmentation yet
    assert view.state(controller).text == "" and not view.state(controller).can_continue  # nothing selected
    scene.select_segment("Segment_1")
    assert view.state(controller).text == ""  # no saved prompts
    history = PromptHistory.start(img.shape, drawn, "Segment_1")
    server = {"url": "http://gpu-node:1527", "model": "blobs", "version": "2.6.0"}
    history.add(Step.from_args("point", {"coordinates": (6, 8, 9)}, True, img.shape), server)
    history.add(Step.from_args("bbox", {"bbox": [[6, 7], [3, 15], [4, 18]]}, False, img.shape), server)
    text = history.to_json(scene.ijk_to_ras(), image_digest(img), mask_digest(drawn))
    scene.store_history("Segment_1", text)
    scene.store_history("Segment_2", text[:-40])
    reads = []
    stored_history = controller.stored_history
    controller.stored_history = lambda key: reads.append(key) or stored_history(key)
    state = view.state(controller)
    assert state.continuable and state.can_continue and not state.can_replay and state.report is None
    assert state.text.startswith("Segment_1 has 2 prompts saved with the scene (1 point, 1 box; answered by blobs at "
                                 "gpu-node:1527). Continue rebuilds them")
    assert view.state(controller).can_continue and reads == ["Segment_1"]  # checked once while nothing changed
    claiming = threading.Event()

    def connect():  # a claim on its way: the controller is busy meanwhile
        claiming.wait(30)
        raise ServerUnreachableError("not now")

    busy = Controller(scene, connect)
    busy.connect()
    state = view.state(busy)
    assert busy.busy and state.continuable and not state.can_continue  # offered, pressed once nothing runs
    claiming.set()
    busy.close()
    scene.select_segment("Segment_2")
    state = view.state(controller)
    assert not state.continuable and state.text == state.report and state.report.startswith(
        "The saved prompts of Segment_2 are not used: the saved prompt history is not valid JSON")
    assert state.text.endswith("The next prompt starts afresh from the segment.")
    assert view.state(controller).report is None  # reported once
    view.forget()  # another scene: reported again
    assert view.state(controller).report is not None
    scene.select_segment("Segment_1")
    summary = controller.continue_segment()
    assert continued_text("Segment_1", summary) == ("Continuing Segment_1 from its 2 saved prompts (1 point, 1 box): "
                                                    "the next prompt rebuilds them on the server first.")
    state = view.state(controller)
    assert state.text == "Segment_1: 2 prompts since its last reset (1 point, 1 box), saved with the scene."
    assert state.can_replay and not state.continuable and state.replaying == 0
    controller.close()


def test_replay_targets_names_and_messages():
    from SlicerNNInteractiveLib.controller import Job, replay_segment_name
    from SlicerNNInteractiveLib.presenter import busy_text, result_text
    from SlicerNNInteractiveLib.settings import MAX_REPLAY_SERVERS, ServerSettings

    store = {"ServerURL": "http://gpu-a:1527", "APIKey": "secret", "ConsentedServers": "http://gpu-b:1527"}
    settings = ServerSettings(lambda name, default: store.get(name, default), store.__setitem__)
    assert settings.replay_servers() == ["http://gpu-a:1527", "http://gpu-b:1527"]
    settings.remember_replay_server("http://gpu-c:1527")
    settings.remember_replay_server("http://gpu-b:1527")
    assert settings.replay_servers() == ["http://gpu-b:1527", "http://gpu-c:1527", "http://gpu-a:1527"]
    for n in range(2 * MAX_REPLAY_SERVERS):
        settings.remember_replay_server("http://h%d:1" % n)
    assert len(store["ReplayServers"]) == MAX_REPLAY_SERVERS
    assert settings.key_for("http://gpu-a:1527") == "secret" and settings.key_for("http://gpu-b:1527") is None
    assert replay_segment_name("Liver", "nnInteractive 2") == "Liver on nnInteractive 2"
    assert replay_segment_name("Liver", None, "blobs", "http://gpu-b:1527") == "Liver on blobs (gpu-b:1527)"
    assert replay_segment_name("Liver", None, None, "gpu-b:1527") == "Liver on gpu-b:1527"
    assert replay_segment_name("Liver") == "Liver on another server"
    job = Job("replay", {"where": "gpu-b:1527"})
    job.progress = (3, 12)
    assert busy_text(job, 1) == "Replaying the prompts on gpu-b:1527: 3 of 12..."
    assert result_text(job, {"replayed": 12, "total_ms": 4000, "segment_name": "Liver on gpu-b:1527"}) == (
        "Replayed 12 prompt(s) on gpu-b:1527 in 4.0 s: compare your segment with the new one, Liver on gpu-b:1527.")
    message = failure_message(ServerUnreachableError("Cannot reach gpu-b:1527."), 0, job)
    assert message == "The replay on gpu-b:1527 failed: Cannot reach gpu-b:1527.\nNo segment was changed."
