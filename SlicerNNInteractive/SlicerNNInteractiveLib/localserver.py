"""Start and stop an nnInteractive server on this computer (127.0.0.1, a free port, a random API key).

Used by the Slicer module's "Start local server" button; plain Python (subprocess + requests), so it is
tested without Slicer. The caller polls ``status()`` (or calls ``wait_ready``) instead of blocking its GUI.
"""

import os
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time


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
        self._lock = threading.Lock()

    def argv(self):
        """The full command line (the key included: do not log it)."""
        reserved = {"--host", "--port", "--api-key"}
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in reserved:
                raise ValueError("%s is chosen by Slicer for a local server; remove it from the extra arguments"
                                 % arg.split("=", 1)[0])
        return self.command + ["--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key] + \
            self.extra_args

    def start(self):
        """Start the process and a thread that waits until it answers. Returns at once."""
        if self.command and not self.command[0]:
            raise ValueError("Choose the nninteractive-slicer-server executable first.")
        exe = self.command[0]
        if os.sep in exe or (os.altsep and os.altsep in exe):
            if not os.path.isfile(exe):
                raise ValueError("The server executable %s does not exist." % exe)
        argv = self.argv()
        log = open(self.log_path, "w")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["NO_PROXY"] = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1", "localhost") if x)
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
        with self._lock:
            self._state, self._message = self.STARTING, "Starting %s on port %d..." % (os.path.basename(exe), self.port)
        t = threading.Thread(target=self._wait_thread, name="nninteractive-local-server-wait")
        t.daemon = True
        t.start()

    def _wait_thread(self, timeout=600.0):
        import requests

        session = requests.Session()
        session.trust_env = False  # never through a proxy to loopback
        deadline = time.monotonic() + timeout
        while True:
            proc = self.process
            if proc is None:
                return
            code = proc.poll()
            if code is not None:
                with self._lock:
                    self._state = self.FAILED
                    self._message = "The server exited (code %s) before answering:\n%s" % (code, self.log_tail())
                return
            try:
                if session.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    with self._lock:
                        self._state, self._message = self.READY, "Running at %s (pid %d)." % (self.url, proc.pid)
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                with self._lock:
                    self._state = self.FAILED
                    self._message = "The server did not answer within %.0f s:\n%s" % (timeout, self.log_tail())
                return
            time.sleep(0.25)

    def status(self):
        """(state, message): state is one of starting / ready / failed / stopped."""
        with self._lock:
            state, message = self._state, self._message
        if state == self.READY and self.process is not None and self.process.poll() is not None:
            with self._lock:
                self._state = self.FAILED
                self._message = "The server stopped (code %s):\n%s" % (self.process.returncode, self.log_tail())
            return self.status()
        return state, message

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

    def stop(self, timeout=10.0):
        proc, self.process = self.process, None
        with self._lock:
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
