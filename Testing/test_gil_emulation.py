"""The controller under a GUI thread that holds the GIL like Slicer's (PythonQt without thread support): prompts
complete and an idle session survives, driven only by the module's own timer (Controller.tick at
Controller.tick_interval_ms). Its latency cost per prompt is measured by Testing/benchmark/gil_emulation.py."""

import pytest

import pythonqt_gil
from conftest import our_server
from test_equivalence import make_image

from SlicerNNInteractiveLib.client import RemoteSession
from SlicerNNInteractiveLib.controller import Controller
from SlicerNNInteractiveLib.scene import ArrayScene

LIVENESS_S = 1.0


@pytest.fixture(scope="module")
def server(quiet_model, tmp_path_factory):
    with our_server(quiet_model, tmp_path_factory.mktemp("gil"), "--no-autozoom", "--max-sessions", "4",
                    "--liveness-timeout-seconds", str(LIVENESS_S), "--idle-timeout-seconds", "120") as (url, _):
        yield url


def test_prompts_complete_and_an_idle_session_survives_while_the_gui_thread_holds_the_gil(server):
    image = make_image()[0]
    errors = []
    c = Controller(ArrayScene(image), lambda: RemoteSession(server),
                   on_error=lambda exc, job, dropped: errors.append(exc))
    timer = pythonqt_gil.ControllerTimer(c)
    try:
        for n in range(3):
            c.submit("point", {"coordinates": (20 + n, 30, 18)})
            assert pythonqt_gil.run([timer], until=lambda: not c.busy, seconds=60), "the prompt never finished"
        assert errors == [] and len(c.timings) == 3
        lease = c.sync.session._lease_token
        # Idle for more than twice the liveness timeout; only the module's timer runs Python meanwhile.
        assert not pythonqt_gil.run([timer], seconds=2.5 * LIVENESS_S)
        assert c.tick_interval_ms() is not None  # the timer keeps running while a session exists
        c.submit("point", {"coordinates": (22, 28, 18)})
        assert pythonqt_gil.run([timer], until=lambda: not c.busy, seconds=60)
        assert errors == [] and c.sync.session._lease_token == lease  # the same session: not reaped
        assert c.sync.uploads["image"] == 1  # the volume was sent once
    finally:
        c.close()
    assert c.tick_interval_ms() is None  # closed: no session, the timer may stop


def test_without_the_idle_timer_the_session_is_reaped(server):
    """The failure the idle ticks prevent (and proof that the emulation starves threads): a timer that stops when
    no prompt runs, as the module's poll timer did, lets the session expire while the user looks at the result."""
    image = make_image()[0]
    c = Controller(ArrayScene(image), lambda: RemoteSession(server))

    class PollWhileBusy(pythonqt_gil.ControllerTimer):
        def interval_ms(self):
            return 25 if self.controller.busy else None

        def fire(self):
            self.controller.poll()

    timer = PollWhileBusy(c)
    try:
        c.submit("point", {"coordinates": (20, 30, 18)})
        assert pythonqt_gil.run([timer], until=lambda: not c.busy, seconds=60)
        lease = c.sync.session._lease_token
        pythonqt_gil.run([timer], seconds=2.5 * LIVENESS_S)
        c.submit("point", {"coordinates": (22, 28, 18)})
        assert pythonqt_gil.run([timer], until=lambda: not c.busy, seconds=60)
        assert c.sync.session._lease_token != lease and c.sync.uploads["image"] == 2  # reaped, sent again
    finally:
        c.close()
