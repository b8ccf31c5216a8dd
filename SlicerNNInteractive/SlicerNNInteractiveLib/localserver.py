"""Start and stop an nnInteractive server on this computer (127.0.0.1, a free port, a random API key).

Used by the Slicer module's "Start local server" button; plain Python (subprocess + urllib), so it is
tested without Slicer. The caller polls ``status()`` (or calls ``wait_ready``) from its GUI thread instead of
blocking: each call checks the process and the health endpoint at once (connecting to a port on this computer is
refused or accepted immediately), so no background thread has to be scheduled (in Slicer a Python thread starves
while the GUI is idle, see DESIGN.md section 8).

The API key goes to the server in the environment (``NN_INTERACTIVE_API_KEY``), never on its command line, where
any user of the computer could read it. ``env``: the environment to start from; inside Slicer pass
``slicer.util.startupEnvironment()``, else the server inherits Slicer's ``PYTHONHOME`` / ``PYTHONPATH``.
"""

import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from .urls import answers_healthz


def free_port(host="127.0.0.1"):
    s = socket.socket()
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def split_arguments(text):
    """Extra command-line arguments as typed by the user (quoted like a POSIX shell; Windows paths allowed)."""
    text = (text or "").strip()
    if not text:
        return []
    return shlex.split(text, posix=(os.name != "nt"))


class LocalServer(object):
    """One server process. ``command``: the executable (a path or a list, e.g. [python, "-m", module])."""

    STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"

    def __init__(self, command, extra_args=None, port=None, api_key=None, log_path=None, env=None):
        self.command = [command] if isinstance(command, str) else list(command)
        self.extra_args = list(extra_args or [])
        self.port = int(port or free_port())
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.url = "http://127.0.0.1:%d" % self.port
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), "nninteractive-server-%d.log" % self.port)
        self.env = env
        self.process = None
        self._state = self.STOPPED
        self._message = ""
        self._deadline = None

    def argv(self):
        """The full command line (without the key, which goes in the environment)."""
        reserved = {"--host", "--port", "--api-key"}
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in reserved:
                raise ValueError("%s is chosen by Slicer for a local server; remove it from the extra arguments"
                                 % arg.split("=", 1)[0])
        return self.command + ["--host", "127.0.0.1", "--port", str(self.port)] + self.extra_args

    def environment(self):
        """The server's environment: ``env`` (or this process's) with the key, unbuffered output and no proxy
        for loopback."""
        env = dict(os.environ if self.env is None else self.env)
        env["NN_INTERACTIVE_API_KEY"] = self.api_key
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["NO_PROXY"] = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1", "localhost") if x)
        return env

    def start(self, timeout=600.0):
        """Start the process. Returns at once; ``status()`` tells when it answers (within ``timeout`` s)."""
        if self.command and not self.command[0]:
            raise ValueError("Choose the nninteractive-slicer-server executable first.")
        exe = self.command[0]
        if os.sep in exe or (os.altsep and os.altsep in exe):
            if not os.path.isfile(exe):
                raise ValueError("The server executable %s does not exist." % exe)
        argv = self.argv()
        env = self.environment()
        log = open(self.log_path, "w")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, **kwargs)
        except OSError as exc:
            log.close()
            raise ValueError("Could not start %s: %s" % (exe, exc))
        log.close()
        self._deadline = time.monotonic() + timeout
        self._state, self._message = self.STARTING, "Starting %s on port %d..." % (os.path.basename(exe), self.port)

    def status(self):
        """(state, message): state is one of starting / ready / failed / stopped. Checks at once, never waits
        longer than the health request to this computer."""
        proc = self.process
        if proc is None or self._state in (self.FAILED, self.STOPPED):
            return self._state, self._message
        code = proc.poll()
        if code is not None:
            what = "stopped" if self._state == self.READY else "exited before answering"
            self._state = self.FAILED
            self._message = "The server %s (code %s):\n%s" % (what, code, self.log_tail())
        elif self._state == self.STARTING:
            if answers_healthz(self.url, timeout=1.0):
                self._state, self._message = self.READY, "Running at %s (pid %d)." % (self.url, proc.pid)
            elif time.monotonic() > self._deadline:
                self._state = self.FAILED
                self._message = "The server did not answer in time:\n%s" % self.log_tail()
        return self._state, self._message

    def wait_ready(self, timeout=600.0, interval=0.1, pump=None):
        deadline = time.monotonic() + timeout
        while True:
            state, message = self.status()
            if state != self.STARTING:
                return state == self.READY
            if pump is not None:
                pump()
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def log_tail(self, n=2000):
        try:
            with open(self.log_path, "r") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout=3.0):
        proc, self.process = self.process, None
        self._state, self._message = self.STOPPED, "Not running."
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def python_module_command(module="nninteractive_slicer_server"):
    """``[this python, -m, module]``: for tests and for servers installed in Slicer's own Python."""
    return [sys.executable, "-m", module]
