"""Several of our servers behind a real HAProxy on loopback, with the configuration shipped in
``server/deploy/haproxy/haproxy.cfg`` (its backend addresses and agent ports come from environment variables):
used by ``test_scale_out.py`` and ``benchmark/scale_out.py``.
"""

import contextlib
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time

import requests

from conftest import REPO, SERVER_ENV, TORCH_THREADS, free_port, running

HAPROXY_CFG = os.path.join(REPO, "server", "deploy", "haproxy", "haproxy.cfg")
BACKENDS = ("gpu1", "gpu2")  # the server names (and cookie values) of the shipped configuration


def haproxy_binary():
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.access(p, os.X_OK)), None)


def _wait_healthy(procs, urls, logs, timeout):
    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" % (procs[i].returncode, open(logs[i]).read()[-3000:]))
            try:
                if requests.get(urls[i] + "/healthz", timeout=1).status_code == 200:
                    pending.discard(i)
            except requests.RequestException:
                pass
        if pending and time.monotonic() > deadline:
            raise RuntimeError("server did not answer in %.0f s:\n%s" % (timeout, open(logs[min(pending)]).read()[-3000:]))
        if pending:
            time.sleep(0.2)


class Backend:
    def __init__(self, name, url, agent_port, proc, log_path):
        self.name, self.url, self.agent_port, self.proc, self.log_path = name, url, agent_port, proc, log_path

    @property
    def address(self):
        return self.url.split("://", 1)[1]

    def info(self):
        return requests.get(self.url + "/x/info", timeout=5).json()

    def metrics(self):
        return requests.get(self.url + "/metrics", timeout=5).text


@contextlib.contextmanager
def our_servers(model_dir, tmp_dir, count, *flags, threads=TORCH_THREADS):
    """``count`` of our servers, started together (each with its own --agent-port); yields ``Backend``s named like
    the configuration's servers."""
    procs, backends, logs = [], [], []
    try:
        for i in range(count):
            port, agent = free_port(), free_port()
            while agent == port:
                agent = free_port()
            url = "http://127.0.0.1:%d" % port
            log_path = os.path.join(str(tmp_dir), "server-%s-%d.log" % (BACKENDS[i], port))
            cmd = [sys.executable, "-m", "nninteractive_slicer_server", "--model-dir", str(model_dir), "--device",
                   "cpu", "--port", str(port), "--agent-port", str(agent), "--torch-n-threads", str(threads), *flags]
            with open(log_path, "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=SERVER_ENV))
            logs.append(log_path)
            backends.append(Backend(BACKENDS[i], url, agent, procs[-1], log_path))
        _wait_healthy(procs, [b.url for b in backends], logs, 180.0)
        yield backends
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


class Balancer:
    def __init__(self, url, stats_url, proc, log_path):
        self.url, self.stats_url, self.proc, self.log_path = url, stats_url, proc, log_path

    def servers(self):
        """HAProxy's view of each server: ``{name: {"status": "UP" / "DRAIN (agent)" / "DOWN"..., "weight": int,
        ...}}`` from the status page's CSV."""
        text = requests.get(self.stats_url + ";csv", timeout=5).text.lstrip("# ")
        return {row["svname"]: dict(row, weight=int(row["weight"] or 0)) for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "gpus" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_for(self, predicate, what, timeout=15.0):
        """Poll the status page until ``predicate(servers())`` holds; returns the servers then."""
        deadline = time.monotonic() + timeout
        while True:
            servers = self.servers()
            if predicate(servers):
                return servers
            if time.monotonic() > deadline:
                raise AssertionError("HAProxy did not report %s within %.0f s: %s" % (
                    what, timeout, {k: (v["status"], v["weight"], v.get("last_agt")) for k, v in servers.items()}))
            time.sleep(0.1)


def accepting(servers, name):
    """Whether HAProxy gives ``name`` new sessions: up, not drained, a weight above 0."""
    return servers[name]["status"] == "UP" and servers[name]["weight"] > 0


def drained(servers, name):
    return servers[name]["status"].startswith("DRAIN")


@contextlib.contextmanager
def balancer(backends, tmp_dir, config=HAPROXY_CFG):
    """A real HAProxy with the shipped configuration in front of ``backends``; waits until it has seen every server
    up and heard from each agent."""
    binary = haproxy_binary()
    if binary is None:
        raise RuntimeError("haproxy is not installed")
    port, stats = free_port(), free_port()
    # On loopback, plain HTTP (the shipped configuration serves TLS unless NNI_PLAIN_HTTP says otherwise)
    env = dict(os.environ, NNI_BIND="127.0.0.1:%d" % port, NNI_STATS_BIND="127.0.0.1:%d" % stats, NNI_PLAIN_HTTP="1")
    for i, b in enumerate(backends, 1):
        env["NNI_BACKEND%d" % i] = b.address
        env["NNI_AGENT_PORT%d" % i] = str(b.agent_port)
    log_path = os.path.join(str(tmp_dir), "haproxy-%d.log" % port)
    check = subprocess.run([binary, "-c", "-f", config], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError("haproxy -c refused %s:\n%s%s" % (config, check.stdout, check.stderr))
    lb = Balancer("http://127.0.0.1:%d" % port, "http://127.0.0.1:%d/stats" % stats, None, log_path)
    with running([binary, "-db", "-f", config], lb.url, log_path, timeout=20, env=env,
                 ready=lambda: lb.servers() is not None, what="haproxy") as proc:
        lb.proc = proc
        names = [b.name for b in backends]
        lb.wait_for(lambda s: all(accepting(s, n) and "agent" in (s[n].get("last_agt") or "") for n in names),
                    "every server up with its agent heard", timeout=20)
        yield lb


def count_requests(metrics_text, endpoints, status="200"):
    """Sum of ``nninteractive_http_requests_total`` over ``endpoints`` (route templates) answered with ``status``."""
    total = 0.0
    for line in metrics_text.splitlines():
        m = re.match(r'nninteractive_http_requests_total\{([^}]*)\} ([0-9.e+]+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("endpoint") in endpoints and labels.get("status") == status:
            total += float(m.group(2))
    return int(total)
