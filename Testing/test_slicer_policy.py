"""The module's decisions, without Qt or Slicer: prompt dispatch and failure policy (one failure, one message; points
never sent are removed), against a server port nothing listens on and a real server."""

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
