"""Free capacity, for a load balancer: HAProxy's agent-check (``--agent-port``), ``/x/info`` and ``/metrics``.

One figure, computed the same way everywhere (``free_capacity``):

* ``free_sessions``: session slots nobody holds or is claiming (``--max-sessions`` less those);
* ``gpu_queue``: what a prompt sent now waits behind on the prediction thread (``scheduler.DeviceQueue``): prompts
  waiting or running, and the automatic piece running; automatic pieces that wait never go before a prompt, so a
  server busy with automatic runs is not counted as busy for prompts;
* ``weight``: 1..100, the share of new sessions this server should get: the free share of the slots, divided by
  ``1 + predictions waiting behind the running one`` (a long GPU queue makes a server less attractive); 0 when no
  slot is free or while draining;
* ``state``: ``ready`` (slots free), ``full`` or ``draining`` (SIGTERM: shutdown.py).

The agent-check responder is a TCP listener in the server's event loop. For every connection it writes one line
(HAProxy reads up to the first ``\\n``: words separated by spaces) and closes:

* ``up ready 75%``: slots free. ``75%`` sets the server's weight to 75 % of the ``weight`` in HAProxy's
  ``server`` line (give every server ``weight 100`` so that the percentages keep their resolution); ``ready``
  cancels an earlier ``drain``: in HAProxy only the agent can undo what the agent set;
* ``up drain``: full, or draining on SIGTERM. HAProxy sends this server no new session, while requests that carry
  its stickiness cookie still reach it (DRAIN admits persistent traffic), so the sessions it holds carry on.

``up`` only confirms what the health check (``/healthz``) says; it never overrides a failed health check. ``maint``
and ``down`` are never sent: a full or draining server still serves its sessions, and the agent's reply must not
take it out of the farm. What HAProxy may send first (``agent-send``) is read and ignored.

The listener binds to its own address (``--agent-host``, loopback by default: the balancer's network only, never
the clients'), holds at most ``MAX_AGENT_CONNECTIONS`` connections at once (one more is closed at once, unanswered)
and each for at most ``READ_TIMEOUT`` after its reply.
"""

import asyncio
import logging

log = logging.getLogger("nninteractive_slicer_server")

READ_TIMEOUT = 1.0  # after the reply: how long to wait for the balancer to close (or for what it sent)
MAX_AGENT_CONNECTIONS = 32  # a balancer opens one per server line and check interval


def free_capacity(srv):
    """``{"free_sessions", "max_sessions", "gpu_queue", "weight", "state"}`` for ``srv`` (an ``app.Server``)."""
    registry = srv.registry
    slots = registry.max_sessions
    free = registry.free()
    queued = len(srv.engine.queue)
    if getattr(srv, "draining", False):
        state, weight = "draining", 0
    elif free <= 0:
        state, weight = "full", 0
    else:
        waiting = max(0, queued - 1)  # behind the one running
        state, weight = "ready", max(1, min(100, int(round(100.0 * free / slots / (1 + waiting)))))
    return {"free_sessions": max(0, free), "max_sessions": slots, "gpu_queue": queued, "weight": weight,
            "state": state}


def agent_reply(srv):
    """The line HAProxy's agent-check reads (see the module docstring), with its ``\\n``."""
    cap = free_capacity(srv)
    if cap["state"] == "ready":
        return "up ready %d%%\n" % cap["weight"]
    return "up drain\n"


async def start_agent(srv, host, port, max_connections=MAX_AGENT_CONNECTIONS):
    """Listen for HAProxy's agent-check on ``host:port``; returns the ``asyncio.Server`` (close it to stop)."""
    open_ = [0]

    async def answer(reader, writer):
        if open_[0] >= max_connections:  # a flood: drop it unanswered, never queue it
            writer.transport.abort()
            return
        open_[0] += 1
        try:
            writer.write(agent_reply(srv).encode("ascii"))
            await writer.drain()
            # Read what the balancer sent (agent-send) or its close, so that closing here never resets a connection
            # with unread data in it (which could lose the reply before HAProxy read it).
            try:
                await asyncio.wait_for(reader.read(4096), READ_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        except Exception:
            log.debug("agent-check connection failed", exc_info=True)
        finally:
            open_[0] -= 1
            writer.close()

    try:
        server = await asyncio.start_server(answer, host, port)
    except OSError as exc:
        log.error("cannot listen for HAProxy's agent-check on %s:%d (%s)", host, port, exc.strerror or exc)
        raise
    log.info("agent-check (free capacity for HAProxy) on %s:%d", host, port)
    return server
