"""The deployment files under server/deploy/ (Dockerfile, compose.yaml, Kubernetes manifests): offline, in a second.

No container engine or cluster is needed (none runs on the development and CI machines): the files are parsed and
their essentials checked against each other and against the server's own command line: a non-root user, no key in
any file, probes on /healthz, one GPU per server, cookie affinity, grace periods longer than the shutdown deadline,
the HAProxy configuration shared with the scale-out test; and what makes them safe by default (issue 16): TLS at the
balancer, named users with per-user limits, memory limits, read-only roots with only /tmp and the jobs volume
writable, dropped capabilities, pinned images, a status page on loopback behind a password, X-Forwarded-For believed
from the balancer only, a NetworkPolicy. HAProxy checks its own configuration where it is installed (CI installs
it). Linters run too where they are installed (hadolint, yamllint, kubernetes-validate, docker-compose / docker
compose); each is skipped, saying so, where it is not.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "server", "deploy")
KUBE = os.path.join(DEPLOY, "kubernetes")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
COMPOSE = os.path.join(DEPLOY, "compose.yaml")
HAPROXY_CFG = os.path.join(DEPLOY, "haproxy", "haproxy.cfg")
API_PORT, AGENT_PORT = 1527, 1528
# Flags the deployment files pass that another part of issue 12 adds to the server (the agent-check responder);
# checked once the server has them.
PENDING_FLAGS = {"--agent-port"}


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def deploy_files():
    out = []
    for root, dirs, files in os.walk(DEPLOY):
        dirs[:] = [d for d in dirs if d not in ("secrets", "certs")]  # git-ignored keys and certificates of compose
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def yaml_files():
    return [p for p in deploy_files() if p.endswith((".yaml", ".yml"))]


def kube_docs():
    docs = []
    for path in sorted(os.listdir(KUBE)):
        if path.endswith(".yaml") and path != "kustomization.yaml":
            docs += [(path, d) for d in yaml.safe_load_all(_read(os.path.join(KUBE, path))) if d]
    return docs


def kube_one(kind, name=None):
    found = [d for _, d in kube_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, "expected one %s%s, found %d" % (kind, " " + name if name else "", len(found))
    return found[0]


def interpolate(value):
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with the defaults (no .env)."""
    def sub(m):
        return m.group(3) or ""
    return re.sub(r"\$\{(\w+)(:?-)?([^}]*)\}", sub, value) if isinstance(value, str) else value


def server_parser():
    try:
        from nninteractive_slicer_server import cli  # installed (Testing/run_tests.sh installs ./server)
    except ImportError:
        sys.path[:0] = [os.path.join(REPO, "server"), os.path.join(REPO, "SlicerNNInteractive")]
        from nninteractive_slicer_server import cli
    return cli.build_parser()


def check_server_args(args, where):
    """Every flag is the server's own (argparse accepts the whole line), apart from those still pending."""
    parser = server_parser()
    known = set(parser._option_string_actions)
    pending = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
    unknown = [f for f in pending if f not in PENDING_FLAGS]
    assert not unknown, "%s passes flags the server does not have: %s" % (where, unknown)
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a.split("=")[0] in pending:
            skip = "=" not in a
            continue
        cleaned.append(a)
    try:
        return parser.parse_args(cleaned)
    except SystemExit:
        pytest.fail("%s: the server's command line refuses %s" % (where, cleaned))


# ---- Dockerfile ------------------------------------------------------------------------------------------------

def dockerfile_instructions():
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and parser directives dropped."""
    out, cur = [], ""
    for line in _read(DOCKERFILE).splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def final_stage():
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def build_args():
    return dict(re.match(r"(\w+)=?(.*)", a).groups() for w, a in dockerfile_instructions() if w == "ARG")


def test_dockerfile_runs_as_a_numeric_non_root_user():
    users = [a for w, a in final_stage() if w == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    uid = build_args().get(user.strip("${}"), user) if user.startswith("$") else user
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (Kubernetes checks runAsNonRoot), " \
                                            "not %r" % users[-1]
    assert int(uid) == kube_one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_dockerfile_base_pinned_cuda_runtime_and_torch_from_the_cuda_index():
    args = build_args()
    bases = [a.split()[0] for w, a in dockerfile_instructions() if w == "FROM"]
    for base in bases:
        image = args.get(base.strip("${}"), base) if base.startswith("$") else base
        assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image) and not image.endswith(":latest"), \
            "base image %r is not pinned" % image
        assert image.startswith("nvidia/cuda:") and "runtime" in image, image
    text = _read(DOCKERFILE)
    assert re.search(r"pip install --index-url \S+ \S*torch==\$\{TORCH_VERSION\}", text)
    pinned = _read(os.path.join(REPO, "Testing", "constraints.txt"))
    assert "torch==%s" % args["TORCH_VERSION"] in pinned, "the image's torch differs from the one the tests pin"
    assert args["TORCH_INDEX"].endswith("${TORCH_CUDA}") and args["TORCH_CUDA"].startswith("cu")


def test_dockerfile_models_volume_healthcheck_ports_and_entrypoint():
    stage = final_stage()
    env = " ".join(a for w, a in stage if w == "ENV")
    assert "NNINTERACTIVE_MODEL_DIR=/models" in env
    assert any(w == "VOLUME" and "/models" in a for w, a in stage)
    health = [a for w, a in stage if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and ":%d/" % API_PORT in health[0]
    exposed = {int(p) for w, a in stage if w == "EXPOSE" for p in a.split()}
    assert exposed == {API_PORT, AGENT_PORT}
    import json
    entry = json.loads([a for w, a in stage if w == "ENTRYPOINT"][-1])
    cmd = entry[entry.index("nninteractive-slicer-server") + 1:]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == str(API_PORT)
    assert cmd[cmd.index("--agent-port") + 1] == str(AGENT_PORT)
    assert cmd[cmd.index("--agent-host") + 1] == "0.0.0.0"  # another container's balancer reaches it
    check_server_args(cmd, "the Dockerfile's ENTRYPOINT")


def dockerignore_excludes(rel):
    """Docker's rules: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    for line in _read(os.path.join(REPO, ".dockerignore")).splitlines():
        pat = line.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = "".join("(.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*" else
                     "[^/]" if tok == "?" else re.escape(tok) for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pat))
        parts = rel.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not neg
    return excluded


def test_build_context_is_the_repository_root_and_sends_only_what_the_image_needs():
    copies = [a.split() for w, a in dockerfile_instructions() if w == "COPY" and "--from=" not in a]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert os.path.exists(os.path.join(REPO, src)), "COPY %s: not in the repository root" % src
            probe = src if os.path.isfile(os.path.join(REPO, src)) else src + "/__init__.py" \
                if os.path.isfile(os.path.join(REPO, src, "__init__.py")) else src + "/pyproject.toml"
            assert not dockerignore_excludes(probe), ".dockerignore leaves out %s" % probe
    for never in ("server/deploy/secrets/api_key", "server/deploy/compose.yaml", ".venv/bin/python", ".git/config",
                  "Testing/models/blobs/plans.json", "server/nninteractive_slicer_server/__pycache__/cli.cpython.pyc"):
        assert dockerignore_excludes(never), ".dockerignore sends %s" % never
    assert "docker build -f server/deploy/Dockerfile" in _read(DOCKERFILE)
    assert "repository root" in _read(os.path.join(DEPLOY, "README.md"))


# ---- no key anywhere -------------------------------------------------------------------------------------------

KEY_PATTERNS = [
    (re.compile(r"NN_INTERACTIVE_API_KEY\s*[=:]\s*['\"]?[^\s'\"$]"), "NN_INTERACTIVE_API_KEY given a value"),
    (re.compile(r"--api-key[= ]+(?!-)['\"]?\w"), "--api-key with a value on a command line"),
    (re.compile(r"Bearer\s+[A-Za-z0-9._~+/-]{8,}"), "a bearer token"),
    (re.compile(r"scrypt\$"), "a hashed token"),
    (re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/=])"), "a long random-looking string"),
]


def key_findings(text):
    out = []
    for rx, what in KEY_PATTERNS:
        for m in rx.finditer(text):
            found = m.group(0)
            if what.startswith("a long") and not (re.search(r"\d", found) and re.search(r"[a-z]", found)
                                                  and re.search(r"[A-Z]", found)):
                continue  # paths and names (no digits, one case), not random keys
            out.append("%s: %r" % (what, found))
    return out


def test_the_key_finder_finds_keys():
    import base64
    import secrets
    assert key_findings("token: " + secrets.token_urlsafe(32))
    assert key_findings("x " + base64.b64encode(bytes(range(7, 39))).decode())
    assert key_findings("NN_INTERACTIVE_API_KEY=abc") and key_findings('- --api-key "abc"')
    assert key_findings("environment:\n  NN_INTERACTIVE_API_KEY: abc\n")
    assert not key_findings("--api-key-file /run/secrets/x SlicerNNInteractive/SlicerNNInteractiveLib "
                            "NN_INTERACTIVE_API_KEY=$KEY nvidia/cuda:13.0.0-runtime-ubuntu24.04")


@pytest.mark.parametrize("path", deploy_files() + [os.path.join(REPO, ".dockerignore")],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_no_key_in_any_file(path):
    found = key_findings(_read(path))
    assert not found, "%s: %s" % (os.path.relpath(path, REPO), "; ".join(found))


def test_no_key_file_is_tracked_and_the_key_folder_is_ignored():
    ignored = _read(os.path.join(DEPLOY, ".gitignore")).split()
    assert "secrets/" in ignored and "certs/" in ignored and ".env" in ignored
    tracked = subprocess.run(["git", "-C", REPO, "ls-files", "server/deploy"], capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked.stdout.split() if "/secrets/" in f or f.endswith((".key", ".pem", "api_key"))]


# ---- compose ---------------------------------------------------------------------------------------------------

def compose():
    return yaml.safe_load(_read(COMPOSE))


def gpu_services(doc):
    out = {}
    for name, svc in doc["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if devices:
            out[name] = (svc, devices)
    return out


def test_compose_one_gpu_per_server():
    gpus = gpu_services(compose())
    assert len(gpus) >= 2
    ids = []
    for name, (svc, devices) in gpus.items():
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert len(devices[0]["device_ids"]) == 1 and "count" not in devices[0], name
        ids += devices[0]["device_ids"]
    assert len(set(ids)) == len(ids), "two servers share a GPU: %s" % ids


def volume_mounts(svc):
    """{container path: (source, read_only)} of a compose service's volumes (short syntax)."""
    out = {}
    for v in svc.get("volumes") or []:
        parts = v.split(":")
        out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def hardened(svc, name):
    """Read-only root, every capability dropped, no privilege escalation, a memory limit: (limit in bytes)."""
    assert svc.get("read_only") is True, "%s: the root file system must be read-only" % name
    assert svc.get("cap_drop") == ["ALL"], "%s: drop every capability" % name
    assert "no-new-privileges:true" in svc.get("security_opt", []), "%s: no privilege escalation" % name
    limit = svc.get("mem_limit") or svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
    assert limit, "%s: no memory limit" % name
    return server_parser()._option_string_actions["--memory-budget"].type(str(interpolate(limit)))


def test_compose_servers_named_users_limits_and_a_read_only_root():
    doc = compose()
    balancer_ip = interpolate(doc["services"]["haproxy"]["networks"]["backend"]["ipv4_address"])
    jobs_volumes = set()
    for name, (svc, _) in gpu_services(doc).items():
        build = svc["build"]
        assert os.path.normpath(os.path.join(DEPLOY, build["context"])) == REPO, "build context must be the root"
        assert os.path.normpath(os.path.join(REPO, build["dockerfile"])) == DOCKERFILE
        args = [str(interpolate(a)) for a in svc["command"]]
        ns = check_server_args(args, "compose service %s" % name)
        # named users, not one shared key: lease binding, download ownership and per-user limits separate people
        assert ns.keys_file and ns.api_key is None and ns.api_key_file is None
        assert "NN_INTERACTIVE_API_KEY" not in (svc.get("environment") or {})
        mounts = volume_mounts(svc)
        (folder,) = [p for p in mounts if ns.keys_file.startswith(p.rstrip("/") + "/")]
        assert mounts[folder][1] and mounts[folder][0].startswith("./secrets"), "the keys folder: ./secrets, ro"
        assert ns.max_sessions_per_user and int(ns.max_sessions_per_user) < int(ns.max_sessions)
        assert mounts["/models"][1], "%s: models read-only" % name
        assert ns.jobs_dir in mounts and mounts[ns.jobs_dir][0] in doc["volumes"], "--jobs-dir on a named volume"
        jobs_volumes.add(mounts[ns.jobs_dir][0])
        assert ns.forwarded_allow_ips == balancer_ip, "%s believes X-Forwarded-For from %s, not the balancer %s" % (
            name, ns.forwarded_allow_ips, balancer_ip)
        limit = hardened(svc, name)
        assert ns.memory_budget is not None and ns.memory_budget < limit, \
            "%s: each server gets its share of the node's memory, below its container's limit" % name
        assert any(t.startswith("/tmp:") and "size=" in t for t in svc.get("tmpfs", [])), "%s: a bounded /tmp" % name
        assert "ports" not in svc and svc["networks"] == ["backend"], "%s: reachable through HAProxy only" % name
        grace = svc["stop_grace_period"]
        seconds = float(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
        assert seconds > ns.shutdown_deadline_seconds, "%s: stop_grace_period %s <= --shutdown-deadline-seconds %s" \
            % (name, grace, ns.shutdown_deadline_seconds)
    assert len(jobs_volumes) == len(gpu_services(doc)), "each server needs its own jobs volume"
    assert doc["networks"]["backend"].get("internal") is True


def test_compose_haproxy_serves_tls_and_hides_its_status_page():
    doc = compose()
    haproxy = doc["services"]["haproxy"]
    env = haproxy["environment"]
    assert "NNI_PLAIN_HTTP" not in env, "plain HTTP must stay an explicit opt-in"
    mounts = volume_mounts(haproxy)
    (certs,) = [p for p in mounts if env["NNI_CERT"].startswith(p.rstrip("/") + "/")]
    assert mounts[certs][1] and mounts[certs][0].startswith("./certs")
    assert str(env["NNI_STATS_PASSWORD"]).startswith("${NNI_STATS_PASSWORD:?"), "a required stats password"
    published = [str(interpolate(p)) for p in haproxy["ports"]]
    stats_port = env["NNI_STATS_BIND"].rsplit(":", 1)[1]
    for p in published:
        if p.endswith(":" + stats_port):
            assert p.startswith("127.0.0.1:"), "the status page is published beyond this node's loopback: %s" % p
    hardened(haproxy, "haproxy")
    assert re.fullmatch(r"haproxy:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", haproxy["image"]), \
        "HAProxy's image is not pinned to a release: %s" % haproxy["image"]
    for name in doc["services"]:
        if name != "haproxy":
            assert "ports" not in doc["services"][name], "%s publishes a port: only HAProxy may" % name


def test_compose_haproxy_mounts_the_shared_configuration():
    doc = compose()
    haproxy = doc["services"]["haproxy"]
    mounts = [v.split(":") for v in haproxy["volumes"]]
    cfg = [m for m in mounts if m[1] == "/usr/local/etc/haproxy/haproxy.cfg"]
    assert cfg, "haproxy does not mount its configuration"
    assert os.path.normpath(os.path.join(DEPLOY, cfg[0][0])) == HAPROXY_CFG
    servers = set(gpu_services(doc))
    published = [str(interpolate(p)) for p in haproxy["ports"]]
    assert any(p.endswith(":%d" % API_PORT) for p in published)
    backends = {v.split(":")[0] for k, v in (haproxy.get("environment") or {}).items() if k.startswith("NNI_BACKEND")}
    assert backends <= servers, "HAProxy's backends %s are not the compose services %s" % (backends, servers)


def test_compose_backends_match_haproxy_cfg():
    if not os.path.isfile(HAPROXY_CFG):
        pytest.skip("server/deploy/haproxy/haproxy.cfg is not in this checkout yet (the scale-out part of issue 12)")
    cfg = _read(HAPROXY_CFG)
    for word in ("cookie", "leastconn", "agent-check"):
        assert word in cfg
    doc = compose()
    env = doc["services"]["haproxy"].get("environment") or {}
    lines = re.findall(r"^\s*server\s+(\S+)\s+\"?\$\{(\w+)-([^}]*)\}\"?(.*)$", cfg, re.M)
    assert len(lines) >= len(gpu_services(doc)), "haproxy.cfg has fewer servers than compose.yaml"
    for name, var, default, rest in lines:
        host, port = env.get(var, default).rsplit(":", 1)
        assert host in gpu_services(doc) and int(port) == API_PORT, (name, host, port)
        agent = re.search(r"agent-port\s+\"?(?:\$\{\w+-(\d+)\}|(\d+))", rest)
        if agent:
            assert int(agent.group(1) or agent.group(2)) == AGENT_PORT


def haproxy_check(tmp_path, **env):
    binary = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                              if os.access(p, os.X_OK)), None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (CI installs it: .ci/run)")
        pytest.skip("haproxy not installed")
    env = dict(os.environ, NNI_BACKEND1="127.0.0.1:1601", NNI_BACKEND2="127.0.0.1:1602", **env)
    for name in ("NNI_PLAIN_HTTP", "NNI_CERT", "NNI_STATS_PASSWORD"):
        if name not in env or env[name] is None:
            env.pop(name, None)
    return subprocess.run([binary, "-c", "-f", HAPROXY_CFG], env=env, capture_output=True, text=True, timeout=60)


def test_haproxy_serves_tls_by_default_and_plain_http_only_when_asked(tmp_path):
    cfg = _read(HAPROXY_CFG)
    assert re.search(r"^\s*bind \S+ ssl crt ", cfg, re.M) and "ssl-min-ver TLSv1.2" in cfg
    missing = haproxy_check(tmp_path, NNI_CERT=str(tmp_path / "absent.pem"))
    assert missing.returncode != 0, "HAProxy started without its certificate (it would have served plain HTTP?)"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k"),
                    "-out", str(tmp_path / "c"), "-days", "1", "-subj", "/CN=localhost"], check=True,
                   capture_output=True, timeout=60)
    (tmp_path / "server.pem").write_bytes((tmp_path / "c").read_bytes() + (tmp_path / "k").read_bytes())
    tls = haproxy_check(tmp_path, NNI_CERT=str(tmp_path / "server.pem"), NNI_STATS_PASSWORD="x")
    assert tls.returncode == 0, tls.stderr
    plain = haproxy_check(tmp_path, NNI_PLAIN_HTTP="1")
    assert plain.returncode == 0 and "NNI_PLAIN_HTTP is set: serving plain HTTP" in plain.stderr, plain.stderr
    # without a password, the status page answers loopback only; clients' own X-Forwarded-For never pass
    assert re.search(r"\.else\s+http-request deny unless \{ src 127\.0\.0\.0/8 ::1 \}", cfg)
    assert "http-request del-header X-Forwarded-For" in cfg and "option forwardfor" in cfg
    assert re.search(r"timeout http-request (\d+)s", cfg) and int(re.search(r"timeout http-request (\d+)s",
                                                                           cfg).group(1)) <= 10


# ---- Kubernetes ------------------------------------------------------------------------------------------------

def pod_spec():
    return kube_one("Deployment")["spec"]["template"]["spec"]


def server_container():
    (c,) = [c for c in pod_spec()["containers"] if c["name"] == "server"]
    return c


def limits_configmap():
    return kube_one("ConfigMap", "nninteractive-limits")["data"]


def expanded_args():
    """The container's args with $(VAR) replaced from its env (values or the ConfigMap)."""
    env = {}
    for e in server_container()["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == "nninteractive-limits"
            assert ref["key"] in limits_configmap(), "ConfigMap has no key %s" % ref["key"]
            env[e["name"]] = limits_configmap()[ref["key"]]
    out = []
    for a in server_container()["args"]:
        for var in re.findall(r"\$\((\w+)\)", a):
            assert var in env, "args use $(%s), which the container's env does not define" % var
            a = a.replace("$(%s)" % var, env[var])
        out.append(a)
    return out


def test_kubernetes_one_gpu_per_pod_and_resources():
    res = server_container()["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert str(res["requests"].get("nvidia.com/gpu", 1)) == "1"
    assert res["requests"]["cpu"] and res["limits"]["memory"]
    ns = check_server_args(expanded_args(), "the Deployment")
    limit = server_parser()._option_string_actions["--memory-budget"].type(res["limits"]["memory"].replace("i", ""))
    assert ns.memory_budget < limit, "the pod's memory limit must exceed --memory-budget"


def test_kubernetes_non_root_named_users_from_a_secret_and_a_read_only_root():
    spec = pod_spec()
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    csc = server_container()["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]
    ns = check_server_args(expanded_args(), "the Deployment")
    assert ns.api_key is None and ns.api_key_file is None and ns.keys_file
    assert ns.max_sessions_per_user and int(ns.max_sessions_per_user) < int(ns.max_sessions)
    assert ns.forwarded_allow_ips, "X-Forwarded-For must be believed from the ingress / balancer only"
    mounts = {m["name"]: m["mountPath"] for m in server_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (name,) = [n for n, p in mounts.items() if ns.keys_file.startswith(p.rstrip("/") + "/")]
    assert "secret" in volumes[name]
    key = os.path.basename(ns.keys_file)
    items = volumes[name]["secret"].get("items")
    assert not items or key in [i["path"] for i in items]
    for e in server_container()["env"]:
        assert e["name"] != "NN_INTERACTIVE_API_KEY" or "secretKeyRef" in e.get("valueFrom", {})
    assert not [d for _, d in kube_docs() if d["kind"] == "Secret"], "no Secret with a key in the repository"
    claim = volumes[[n for n, p in mounts.items() if p == "/models"][0]]["persistentVolumeClaim"]["claimName"]
    kube_one("PersistentVolumeClaim", claim)
    # what is writable: /tmp (bounded) and the jobs volume (its size the quota)
    (jobs,) = [n for n, p in mounts.items() if p == ns.jobs_dir]
    request = volumes[jobs]["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"]
    assert re.fullmatch(r"\d+[GT]i", request)
    (tmp,) = [n for n, p in mounts.items() if p == "/tmp"]
    assert volumes[tmp]["emptyDir"]["sizeLimit"]


def test_kubernetes_network_policy_admits_only_the_ingress_and_the_balancer():
    policy = kube_one("NetworkPolicy")
    labels = kube_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert all(labels.get(k) == v for k, v in selector.items()) and selector
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"] and policy["spec"]["egress"] == []
    sources = []
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "a rule without 'from' admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
            sources.append(peer["podSelector"]["matchLabels"].get("app.kubernetes.io/name") + "/" +
                           peer["podSelector"]["matchLabels"].get("app.kubernetes.io/component", ""))
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= {API_PORT, AGENT_PORT}
        if AGENT_PORT in ports:  # the agent (no key) only for the balancer
            assert all(p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "balancer"
                       for p in rule["from"])
    assert sorted(sources) == ["ingress-nginx/", "nninteractive/balancer"]


def test_kubernetes_probes_on_healthz():
    c = server_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": API_PORT, "agent": AGENT_PORT}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == API_PORT, probe


def test_kubernetes_graceful_shutdown_outlasts_the_deadline():
    deadline = check_server_args(expanded_args(), "the Deployment").shutdown_deadline_seconds
    c = server_container()
    pre = c.get("lifecycle", {}).get("preStop", {})
    pause = float(pre["exec"]["command"][-1]) if "exec" in pre and pre["exec"]["command"][0] == "sleep" else \
        float(pre.get("sleep", {}).get("seconds", 0))
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > pause + deadline, "terminationGracePeriodSeconds %s <= preStop %s + deadline %s" \
        % (grace, pause, deadline)
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > deadline, "liveness would kill a draining server"


def test_kubernetes_service_and_ingress_with_cookie_affinity():
    labels = kube_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    svc = kube_one("Service", "nninteractive")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    ing = kube_one("Ingress")
    assert ing["spec"]["tls"] and ing["spec"]["tls"][0]["secretName"], "the ingress terminates TLS"
    ann = ing["metadata"]["annotations"]
    p = "nginx.ingress.kubernetes.io/"
    assert ann[p + "affinity"] == "cookie"
    assert ann[p + "affinity-mode"] == "persistent", "balanced mode moves sessions to new pods on scale-up"
    assert ann[p + "session-cookie-name"]
    assert ann.get(p + "service-upstream", "false") != "true", "service-upstream bypasses cookie affinity"
    assert ann[p + "proxy-body-size"] == "0" or re.fullmatch(r"\d+[gG]", ann[p + "proxy-body-size"])
    assert ann[p + "proxy-request-buffering"] == "off"
    assert int(ann[p + "proxy-read-timeout"]) >= 600 and int(ann[p + "proxy-send-timeout"]) >= 600
    backends = [path["backend"]["service"] for rule in ing["spec"]["rules"] for path in rule["http"]["paths"]]
    for b in backends:
        assert b["name"] == "nninteractive" and b["port"]["name"] in [x["name"] for x in svc["spec"]["ports"]]


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load(_read(os.path.join(KUBE, "kustomization.yaml")))
    files = sorted(f for f in os.listdir(KUBE) if f.endswith(".yaml") and f != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    image = server_container()["image"].rsplit(":", 1)[0]
    assert image in [i["name"] for i in kust["images"]]


# ---- docs ------------------------------------------------------------------------------------------------------

def test_readmes_link_and_mark_derived_capacity_figures():
    assert "server/deploy/README.md" in _read(os.path.join(REPO, "README.md"))
    text = _read(os.path.join(DEPLOY, "README.md"))
    assert "DERIVED" in text and "Capacity planning" in text


# ---- linters, where installed ----------------------------------------------------------------------------------

def _tool(*names):
    for name in names:
        path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
        if path:
            return path
    pytest.skip("%s not installed" % " / ".join(names))


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, "%s failed:\n%s%s" % (" ".join(cmd), r.stdout, r.stderr)
    return r


def test_every_yaml_parses():
    for path in yaml_files():
        list(yaml.safe_load_all(_read(path)))


def test_hadolint():
    _run([_tool("hadolint"), DOCKERFILE])


def test_yamllint():
    _run([_tool("yamllint"), "-c", os.path.join(DEPLOY, ".yamllint.yaml"), DEPLOY])


def test_kubernetes_validate():
    files = [os.path.join(KUBE, f) for f in sorted(os.listdir(KUBE)) if f.endswith(".yaml")
             and f != "kustomization.yaml"]
    _run([_tool("kubernetes-validate"), "--strict", "--quiet"] + files)


def test_compose_config():
    try:
        cmd = [_tool("docker-compose")]
    except pytest.skip.Exception:
        docker = _tool("docker")
        if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
            pytest.skip("neither docker-compose nor the docker compose plugin is installed")
        cmd = [docker, "compose"]
    # the status page's password is required (no default): give one, as an operator's .env would
    _run(cmd + ["-f", COMPOSE, "config", "-q"], cwd=DEPLOY, env=dict(os.environ, NNI_STATS_PASSWORD="example"))
