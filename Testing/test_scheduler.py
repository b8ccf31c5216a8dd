"""The prediction thread's queue (``scheduler.DeviceQueue``), in this process, on its own thread: prompts before
automatic pieces, automatic runs round-robin, cancel between pieces (and the run's ``finally`` on the prediction
thread), positions that count what really runs before. Order is proven with events that hold a piece until the test
has queued what it needs (no clock), and with the order the work ran in."""

import threading
import time

import pytest

from nninteractive_slicer_server.cancel import CancelToken, RunCancelled
from nninteractive_slicer_server.scheduler import DeviceQueue

WAIT = 60.0  # generous bound of every wait below: a failure, never a timing


def until(predicate):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.002)


class Background(threading.Thread):
    """Call ``fn(*args, **kw)`` in a thread; ``value`` / ``error`` afterwards."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.value = self.error = None
        self.start()

    def run(self):
        try:
            self.value = self.fn(*self.args, **self.kw)
        except BaseException as exc:
            self.error = exc

    def result(self):
        self.join(WAIT)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.value


def held(order, name, gate=None, started=None):
    """A piece of work that records ``name`` and, with a gate, holds the thread until it is set."""
    def fn():
        order.append(name)
        if started is not None:
            started.set()
        if gate is not None:
            assert gate.wait(WAIT)
        return name
    return fn


def pieces(order, name, n, gate=None, started=None, closed=None, threads=None):
    """``steps`` for ``run_pieces``: ``n`` pieces named ``name1``..; the first held by ``gate``. It tells the queue
    of the last one only once it starts (as a model learns its tiles)."""
    def steps(run):
        run.expect(1)
        try:
            for i in range(1, n + 1):
                if threads is not None:
                    threads.add(threading.current_thread().name)
                held(order, "%s%d" % (name, i), gate if i == 1 else None, started if i == 1 else None)()
                yield
            return name
        finally:
            if closed is not None:
                closed.append(threading.current_thread().name)
    return steps


@pytest.fixture
def q():
    queue = DeviceQueue(name="test-device")
    yield queue
    queue.shutdown()


def test_prompts_run_in_order_and_report_their_wait(q):
    order = []
    assert q.run(held(order, "a"), owner="A") == ("a", pytest.approx(0.0, abs=WAIT))
    with pytest.raises(ZeroDivisionError):
        q.run(lambda: 1 / 0)
    assert order == ["a"] and len(q) == 0


def test_positions_of_prompts(q):
    a, b, c = object(), object(), object()
    assert q.position(a) == {"ahead": 0, "expected_wait_seconds": None, "running": False, "waiting": False,
                             "queued": 0}
    order, gate, started = [], threading.Event(), threading.Event()
    ta = Background(q.run, held(order, "a", gate, started), owner=a)
    assert started.wait(WAIT)
    tb = Background(q.run, held(order, "b"), owner=b)
    tc = Background(q.run, held(order, "c"), owner=c)
    until(lambda: len(q) == 3)
    assert q.position(a)["running"] and q.position(a)["ahead"] == 0
    assert q.position(b)["ahead"] == 1 and q.position(b)["waiting"] and not q.position(b)["running"]
    assert q.position(c)["ahead"] == 2 and q.position(c)["queued"] == 3
    assert q.position(object())["ahead"] == 3  # what a prediction sent now would face
    assert q.position(c)["expected_wait_seconds"] is None  # nothing was timed yet
    gate.set()
    for t in (ta, tb, tc):
        t.result()
    assert order == ["a", "b", "c"] and q.mean_seconds() is not None
    assert q.position(a) == {"ahead": 0, "expected_wait_seconds": 0.0, "running": False, "waiting": False,
                             "queued": 0}


def test_a_prompt_waits_for_the_piece_in_progress_only(q):
    order, gate, started, threads = [], threading.Event(), threading.Event(), set()
    run = Background(q.run_pieces, pieces(order, "auto", 5, gate, started, threads=threads), owner="R", expected=4)
    assert started.wait(WAIT)  # the run's first piece holds the thread
    prompt = Background(q.run, held(order, "prompt"), owner="P")
    until(lambda: len(q) == 2)
    # The prompt waits behind the piece running, never behind the run's other pieces.
    assert q.position("P")["ahead"] == 1 and q.position("P")["waiting"]
    position = q.position("R")
    assert position["running"] and position["ahead"] == 0 and position["pieces"] == {"done": 0, "expected": 5}
    assert q.automatic_runs() == (1, 5)
    gate.set()
    assert prompt.result()[0] == "prompt"
    value, stats = run.result()
    assert value == "auto" and order == ["auto1", "prompt", "auto2", "auto3", "auto4", "auto5"]
    assert stats.done == 5 and stats.ran["predict"] > 0 and threads == {"test-device"}
    assert q.automatic_runs() == (0, 0)


def test_after_a_prompt_automatic_work_waits_a_moment_for_the_next_one():
    """A user clicking one point after another: the next prompt, sent once the answer came, finds no new automatic
    piece started (here the moment is made long, so that the order never depends on how fast this test is)."""
    q = DeviceQueue(name="test-anticipate", anticipate_s=WAIT)
    try:
        order, gate, started = [], threading.Event(), threading.Event()
        run = Background(q.run_pieces, pieces(order, "auto", 3, gate, started))
        assert started.wait(WAIT)
        first = Background(q.run, held(order, "p1"))
        until(lambda: len(q) == 2)
        gate.set()
        first.result()
        q._anticipate_s = 0.0  # after the second prompt, no moment: the run goes on at once
        q.run(held(order, "p2"))
        run.result()
        assert order == ["auto1", "p1", "p2", "auto2", "auto3"]
    finally:
        q.shutdown()


def test_automatic_runs_take_turns_and_positions_count_their_pieces(q):
    order, gate, started = [], threading.Event(), threading.Event()
    first = Background(q.run_pieces, pieces(order, "a", 3, gate, started), owner="A", expected=2)
    assert started.wait(WAIT)
    second = Background(q.run_pieces, pieces(order, "b", 3), owner="B", expected=2)
    until(lambda: q.automatic_runs()[0] == 2)
    third_gate, third_started = threading.Event(), threading.Event()
    prompt = Background(q.run, held(order, "p", third_gate, third_started), owner="P")
    until(lambda: len(q) == 2)
    # B waits for: the prompt queued, and A's piece running (one piece of each run ahead of it in the rotation)
    position = q.position("B")
    assert position["ahead"] == 2 and position["waiting"] and position["pieces"] == {"done": 0, "expected": 2}
    assert q.position("P")["ahead"] == 1  # A's piece, not B's pieces
    assert q.position(None)["queued"] == 1 + 3 + 2  # the prompt, A's pieces (it told one more), B's
    gate.set()
    assert third_started.wait(WAIT)
    assert order == ["a1", "p"]
    third_gate.set()
    prompt.result()
    assert first.result()[0] == "a" and second.result()[0] == "b"
    assert order == ["a1", "p", "b1", "a2", "b2", "a3", "b3"]  # round-robin, one piece each


def test_cancel_stops_a_run_between_pieces_and_closes_it_on_the_prediction_thread(q):
    order, gate, started, closed = [], threading.Event(), threading.Event(), []
    token = CancelToken()
    run = Background(q.run_pieces, pieces(order, "auto", 50, gate, started, closed=closed), owner="R",
                     cancel=token)
    assert started.wait(WAIT)
    token.cancel("test")
    gate.set()
    with pytest.raises(RunCancelled, match="test"):
        run.result()
    assert order == ["auto1"] and closed == ["test-device"]  # its finally ran there, at once
    assert q.automatic_runs() == (0, 0) and q.position("R")["queued"] == 0
    # a token cancelled before the run is queued: nothing runs
    with pytest.raises(RunCancelled):
        q.run_pieces(pieces(order, "never", 1), cancel=token)
    assert order == ["auto1"]


def test_errors_of_a_piece_reach_the_caller_and_the_thread_carries_on(q):
    def steps(run):
        yield
        raise ValueError("bad piece")

    with pytest.raises(ValueError, match="bad piece"):
        q.run_pieces(steps)
    assert q.run(lambda: 42) == (42, pytest.approx(0.0, abs=WAIT))


def test_shutdown_runs_the_prompts_queued_and_cancels_the_runs(q):
    order, gate, started = [], threading.Event(), threading.Event()
    prompt = Background(q.run, held(order, "p", gate, started))
    assert started.wait(WAIT)
    run = Background(q.run_pieces, pieces(order, "auto", 3))
    later = Background(q.run, held(order, "q"))
    until(lambda: len(q) == 2 and q.automatic_runs()[0] == 1)
    stopper = Background(q.shutdown)
    until(lambda: q._closing)
    gate.set()
    stopper.result()
    assert prompt.result()[0] == "p" and later.result()[0] == "q"
    with pytest.raises(RunCancelled, match="shutting down"):
        run.result()
    assert order == ["p", "q"]
    with pytest.raises(RuntimeError, match="shut down"):
        q.run(lambda: None)


def test_a_prompt_awaited_on_the_event_loop_and_cancelled(q):
    """``deps.finished``, the way a prompt awaits the prediction thread from the event loop: cancelled while its work
    waits in the queue, the work never runs; cancelled while it runs, the cancellation waits until it has ended
    (the lease's turn must not be given back while the session is in use); otherwise the result and the wait."""
    import asyncio

    from nninteractive_slicer_server.deps import finished

    order, gate, started = [], threading.Event(), threading.Event()

    async def scenario():
        assert await finished(q.submit(held(order, "plain"))) == ("plain", pytest.approx(0.0, abs=WAIT))
        with pytest.raises(ZeroDivisionError):
            await finished(q.submit(lambda: 1 / 0))
        # queued behind a held piece of work, then cancelled: it never runs
        blocker = asyncio.ensure_future(finished(q.submit(held(order, "blocker", gate, started))))
        assert await asyncio.to_thread(started.wait, WAIT)
        waiting = asyncio.ensure_future(finished(q.submit(held(order, "never"))))
        await asyncio.to_thread(until, lambda: len(q) == 2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # cancelled while its work runs: the task ends only after the work
        blocker.cancel()
        for _ in range(3):  # let the event loop go round (and a worker thread answer) while the work is held
            await asyncio.sleep(0)
            await asyncio.to_thread(lambda: None)
        assert not blocker.done() and order[-1] == "blocker"
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        assert await finished(q.submit(held(order, "after"))) == ("after", pytest.approx(0.0, abs=WAIT))

    asyncio.run(scenario())
    assert order == ["plain", "blocker", "after"] and len(q) == 0
