"""Command line: ``nninteractive-slicer-server`` and its companions to list and download models."""

import argparse
import logging
import os
import sys

from SlicerNNInteractiveLib.urls import is_loopback_host

from . import logs
from .models import StartupError, check_model_dir, resolve_official

log = logging.getLogger("nninteractive_slicer_server")


def build_parser():
    p = argparse.ArgumentParser(
        prog="nninteractive-slicer-server",
        description="Serve nnInteractive promptable 3D segmentation over HTTP (nnInteractive 2.6 remote protocol).")
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="ID", help="official model id, downloaded on first use into "
                   "$NNINTERACTIVE_MODEL_DIR (default ~/.nninteractive); default: the manifest's default model")
    m.add_argument("--model-dir", metavar="DIR", help="serve a local model folder instead (no network needed)")
    m.add_argument("--fold", help="fold folder to load (default: the only fold_* in --model-dir)")
    m.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name (default %(default)s)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; 0.0.0.0 for all)")
    n.add_argument("--port", type=int, default=1527, help="port (default %(default)s)")
    n.add_argument("--agent-port", type=int, metavar="PORT", help="answer HAProxy's agent-check on this TCP port "
                   "(on --agent-host): 'up ready N%%' with N proportional to the free session slots (lower while the "
                   "GPU queue is long), 'up drain' when full or shutting down (default: off)")
    n.add_argument("--agent-host", default="127.0.0.1", help="address the agent-check listens on (default "
                   "%(default)s; the balancer's network only: it needs no key)")
    n.add_argument("--forwarded-allow-ips", metavar="ADDRS", default=os.environ.get("FORWARDED_ALLOW_IPS") or None,
                   help="balancers whose X-Forwarded-For / X-Forwarded-Proto are believed (comma-separated addresses "
                   "or networks, e.g. 10.0.0.7 or 172.16.0.0/12): logs, limits per address and the key check's turns "
                   "then see the client's address; their connections are also exempt from "
                   "--max-connections-per-address (default: $FORWARDED_ALLOW_IPS; none: never believed)")
    n.add_argument("--header-timeout-seconds", type=float, default=10.0, metavar="S", help="a connection must "
                   "deliver each request's headers within S seconds of opening (or of its previous answer), else it "
                   "is closed (default %(default)s)")
    n.add_argument("--keep-alive-seconds", type=float, default=5.0, metavar="S", help="close a connection idle "
                   "this long between requests (default %(default)s)")
    n.add_argument("--max-connections", type=int, metavar="N", help="open connections at once; one more is answered "
                   "503 and closed (default: the open-file limit, raised to its hard limit at start-up, less %d, at "
                   "most %d)" % (128, 4096))
    n.add_argument("--max-connections-per-address", type=int, default=64, metavar="N", help="open connections from "
                   "one client address (the --forwarded-allow-ips balancers excepted); one more is answered 503 and "
                   "closed (default %(default)s)")
    k = p.add_argument_group("keys (when any is set, every request but /healthz needs 'Authorization: Bearer KEY')")
    k.add_argument("--api-key", help="the shared key, user 'shared' (default: $NN_INTERACTIVE_API_KEY; prefer the "
                   "variable or --api-key-file: arguments are visible to other users)")
    k.add_argument("--api-key-file", metavar="PATH", help="read the shared key from this file")
    k.add_argument("--keys-file", metavar="PATH", default=os.environ.get("NN_INTERACTIVE_KEYS_FILE"),
                   help="named users, one salted token hash a line (nninteractive-slicer-server-keys add NAME); "
                   "reread on SIGHUP (default: $NN_INTERACTIVE_KEYS_FILE)")
    t = p.add_argument_group("TLS (serve https:// directly; or leave it to a proxy in front)")
    t.add_argument("--ssl-certfile", metavar="PEM", help="the server's certificate (chain), PEM; needs --ssl-keyfile")
    t.add_argument("--ssl-keyfile", metavar="PEM", help="its private key, PEM; needs --ssl-certfile")
    t.add_argument("--ssl-keyfile-password", help="password of an encrypted key file (default: "
                   "$NN_INTERACTIVE_SSL_KEYFILE_PASSWORD; prefer the variable: arguments are visible to other users)")
    t.add_argument("--ssl-min-version", choices=["1.2", "1.3"], default="1.2", help="oldest TLS version accepted "
                   "(default %(default)s)")
    c = p.add_argument_group("compute")
    c.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or mps (default %(default)s)")
    c.add_argument("--torch-n-threads", type=int, default=8, help="CPU threads for torch (default %(default)s)")
    c.add_argument("--no-torch-compile", action="store_true", help="do not compile the network (compiling is on "
                   "by default on CUDA and paid once at start-up by a warm-up pass)")
    c.add_argument("--no-autozoom", action="store_true", help="turn off adaptive zoom-out for all sessions")
    s = p.add_argument_group("sessions")
    s.add_argument("--max-sessions", type=int, default=1, help="concurrent users (default %(default)s); each holds "
                   "its own image and state, all share one copy of the weights")
    s.add_argument("--idle-timeout-seconds", type=float, default=600.0,
                   help="reap a session after this long without a real action (default %(default)s)")
    s.add_argument("--liveness-timeout-seconds", type=float, default=60.0,
                   help="reap a session after this long without any request, heartbeats included (default %(default)s)")
    s.add_argument("--max-sessions-per-user", type=int, metavar="N", help="sessions one user (one name of the keys "
                   "file, or the shared key) may hold at once (default: --max-sessions)")
    lim = p.add_argument_group("limits (checked before anything is allocated; over a limit: 413)")
    lim.add_argument("--memory-budget", type=parse_size, metavar="BYTES", help="memory all sessions' images, buffers "
                     "and in-flight arrays may hold together, e.g. 48G (default: 3/4 of this machine's RAM); when "
                     "other sessions hold it, a request gets 503 with Retry-After")
    lim.add_argument("--max-image-voxels", type=parse_size, metavar="N", help="largest image, in spatial voxels, e.g. "
                     "512M (default: what fits in half the memory budget)")
    lim.add_argument("--max-body-bytes", type=parse_size, metavar="BYTES", help="largest request body, e.g. 2G "
                     "(default: the largest image as uncompressed float32, plus 16 MiB)")
    lim.add_argument("--max-waiting-per-lease", type=int, default=4, metavar="N", help="requests of one session "
                     "that may wait behind the one it runs; more get 429 with Retry-After (default %(default)s)")
    lim.add_argument("--min-upload-rate", type=parse_size, default="32K", metavar="BYTES", help="bytes per second a "
                     "request body must arrive at on average, after --upload-grace-seconds; slower: 408 (default 32K)")
    lim.add_argument("--upload-grace-seconds", type=float, default=10.0, metavar="S", help="a request body's first "
                     "S seconds are not held to --min-upload-rate (default %(default)s)")
    a = p.add_argument_group("automatic models (nnU-Net; the established model server's /infer, /infer_file, "
                             "/model_info, ... and /x/auto_segment on a session's image)")
    a.add_argument("--model-serve-spec", metavar="PATH", help="model registry (model-serve-spec.yaml) to serve "
                   "(default: $MODEL_SERVE_SPEC, else ./model-serve-spec.yaml when there is one; none: no automatic "
                   "models); an invalid one stops the start-up")
    a.add_argument("--predictor-cache-size", type=int, default=2, metavar="N", help="loaded nnU-Net predictors kept "
                   "at once (default %(default)s)")
    a.add_argument("--predictor-ttl-seconds", type=float, default=600.0, metavar="S", help="drop a predictor unused "
                   "this long (default %(default)s; POST /expire drops them all)")
    a.add_argument("--gpu-memory-wait-seconds", type=float, default=120.0, metavar="S", help="how long a run waits "
                   "for its model's min_mem of free GPU memory before answering 503 (default %(default)s)")
    a.add_argument("--infer-root", action="append", default=[], metavar="DIR", help="a directory whose files /infer "
                   "requests may read and write (repeatable; paths outside every one, and links inside, get 403); "
                   "{user} in it gives each key holder a folder of their own (/data/{user}); none: /infer on server "
                   "paths is off (uploads to /infer_file still work)")
    a.add_argument("--orthanc-url", metavar="URL", help="the Orthanc whose series /infer_orthanc segments and which "
                   "gets the DICOM SEGs back (default: $ORTHANC_URL; credentials from $ORTHANC_USER and "
                   "$ORTHANC_PASSWORD; none: /infer_orthanc is off)")
    a.add_argument("--jobs-dir", metavar="DIR", help="where uploads are received and jobs (/infer_file, POST /jobs) "
                   "unpack and keep their outputs and index; jobs survive a restart there (default: a temporary "
                   "folder, removed at exit)")
    a.add_argument("--max-running-jobs", type=int, default=2, metavar="N", help="automatic studies (/infer, "
                   "/infer_file, /jobs) run at once; more wait their turn (default %(default)s)")
    lim.add_argument("--max-upload-bytes", type=parse_size, default="2G", metavar="BYTES", help="largest /infer_file "
                     "upload (default 2G)")
    lim.add_argument("--max-unpacked-bytes", type=parse_size, default="8G", metavar="BYTES", help="what one uploaded "
                     "archive may unpack to (default 8G)")
    lim.add_argument("--max-archive-files", type=int, default=10000, metavar="N", help="entries of one uploaded "
                     "archive (default %(default)s)")
    lim.add_argument("--max-jobs", type=int, default=100, metavar="N", help="jobs (uploads and POST /jobs, any "
                     "status) kept at once; one more gets 503 (default %(default)s)")
    lim.add_argument("--max-jobs-per-user", type=int, metavar="N", help="jobs one user keeps at once; one more gets "
                     "429 (default: a quarter of --max-jobs)")
    lim.add_argument("--max-job-bytes-per-user", type=parse_size, metavar="BYTES", help="what one user's jobs and "
                     "uploads may take in the jobs folder (default: twice --max-upload-bytes plus "
                     "--max-unpacked-bytes)")
    lim.add_argument("--job-ttl-seconds", type=float, default=86400.0, metavar="S", help="delete a job's outputs this "
                     "long after it finished (default %(default)s)")
    o = p.add_argument_group("operations")
    o.add_argument("--verbose", action="store_true", help="log what each session does")
    o.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level (default %(default)s)")
    o.add_argument("--log-json", action="store_true", help="log one JSON object per line (time, level, logger, "
                   "message, request_id) instead of text")
    o.add_argument("--metrics-user-labels", action="store_true", help="name each user in /metrics' user labels "
                   "(default: 'named' for every user of the keys file, so a scrape tells no one's activity)")
    o.add_argument("--shutdown-deadline-seconds", type=float, default=30.0, metavar="S", help="on SIGTERM: refuse "
                   "new sessions, finish the requests in progress, release every session and exit within S seconds "
                   "(default %(default)s)")
    return p


def parse_size(text):
    """``123``, ``64K``, ``512M``, ``48G``, ``1T`` (binary multiples)."""
    text = str(text).strip().upper().rstrip("B").rstrip("I")
    scale = 1
    if text and text[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(text[-1]) + 1))
        text = text[:-1]
    try:
        value = float(text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a size (examples: 1000000, 512M, 48G)" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be positive")
    return int(value)


def check_args(args):
    if args.model and args.model_dir:
        raise StartupError("Pass either --model (an official id) or --model-dir (a local folder), not both.")
    if args.max_sessions < 1:
        raise StartupError("--max-sessions must be at least 1.")
    if args.idle_timeout_seconds <= 0 or args.liveness_timeout_seconds <= 0:
        raise StartupError("--idle-timeout-seconds and --liveness-timeout-seconds must be positive.")
    if args.max_sessions_per_user is not None and args.max_sessions_per_user < 1:
        raise StartupError("--max-sessions-per-user must be at least 1.")
    if args.max_waiting_per_lease < 0:
        raise StartupError("--max-waiting-per-lease must be 0 or more.")
    if args.shutdown_deadline_seconds <= 0:
        raise StartupError("--shutdown-deadline-seconds must be positive.")
    if not 0 < args.port < 65536:
        raise StartupError("--port must be between 1 and 65535.")
    if args.agent_port is not None and not (0 < args.agent_port < 65536 and args.agent_port != args.port):
        raise StartupError("--agent-port must be between 1 and 65535, and not --port.")
    if args.header_timeout_seconds <= 0 or args.keep_alive_seconds <= 0 or args.upload_grace_seconds < 0:
        raise StartupError("--header-timeout-seconds and --keep-alive-seconds must be positive, "
                           "--upload-grace-seconds 0 or more.")
    if (args.max_connections is not None and args.max_connections < 1) or args.max_connections_per_address < 1:
        raise StartupError("--max-connections and --max-connections-per-address must be at least 1.")
    from .connections import parse_networks

    try:
        args.trusted_proxies = parse_networks(args.forwarded_allow_ips)
    except ValueError as exc:
        raise StartupError("--forwarded-allow-ips: %s (give addresses or networks, comma-separated)." % exc)
    if args.predictor_cache_size < 1:
        raise StartupError("--predictor-cache-size must be at least 1.")
    for flag in ("predictor_ttl_seconds", "job_ttl_seconds"):
        if getattr(args, flag) <= 0:
            raise StartupError("--%s must be positive." % flag.replace("_", "-"))
    if args.gpu_memory_wait_seconds < 0:
        raise StartupError("--gpu-memory-wait-seconds must be 0 or more.")
    if args.max_archive_files < 1 or args.max_jobs < 1 or args.max_running_jobs < 1:
        raise StartupError("--max-archive-files, --max-jobs and --max-running-jobs must be at least 1.")
    if args.max_jobs_per_user is not None and args.max_jobs_per_user < 1:
        raise StartupError("--max-jobs-per-user must be at least 1.")
    if args.model_dir:
        args.fold = check_model_dir(os.path.abspath(os.path.expanduser(args.model_dir)), args.fold, args.checkpoint)


def check_tls(args):
    """Both TLS files or neither; each readable, the key matching the certificate (checked before the model loads,
    so a wrong file fails in a second with one sentence instead of a traceback from the web server)."""
    if args.ssl_keyfile_password is None:
        args.ssl_keyfile_password = os.environ.get("NN_INTERACTIVE_SSL_KEYFILE_PASSWORD") or None
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise StartupError("TLS needs both --ssl-certfile and --ssl-keyfile (only %s was given)."
                           % ("--ssl-certfile" if args.ssl_certfile else "--ssl-keyfile"))
    if not args.ssl_certfile:
        return
    import ssl

    for flag in ("ssl_certfile", "ssl_keyfile"):
        path = os.path.abspath(os.path.expanduser(getattr(args, flag)))
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise StartupError("--%s %s cannot be read (%s)." % (flag.replace("_", "-"), path, exc.strerror or exc))
        setattr(args, flag, path)

    def no_password():  # instead of OpenSSL asking on the terminal
        raise StartupError("--ssl-keyfile %s is encrypted: give its password in NN_INTERACTIVE_SSL_KEYFILE_PASSWORD "
                           "(or --ssl-keyfile-password)." % args.ssl_keyfile)

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            args.ssl_certfile, args.ssl_keyfile, args.ssl_keyfile_password or no_password)
    except (ssl.SSLError, ValueError, TypeError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise StartupError("--ssl-keyfile %s is not the private key of --ssl-certfile %s."
                               % (args.ssl_keyfile, args.ssl_certfile))
        raise StartupError("--ssl-certfile %s and --ssl-keyfile %s could not be loaded: each must be a PEM file%s (%s)."
                           % (args.ssl_certfile, args.ssl_keyfile,
                              ", and the key's password right" if args.ssl_keyfile_password else "", exc))


def tls_version(text):
    import ssl

    return {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[text]


def check_keys(args):
    """The shared key (--api-key, --api-key-file or $NN_INTERACTIVE_API_KEY) and the keys file, as Identities."""
    from .identities import Identities, KeysFileError

    if args.api_key and args.api_key_file:
        raise StartupError("Pass either --api-key or --api-key-file, not both.")
    api_key = args.api_key
    if args.api_key_file:
        path = os.path.abspath(os.path.expanduser(args.api_key_file))
        try:
            with open(path, encoding="utf-8") as f:
                api_key = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError("--api-key-file %s cannot be read (%s)." % (path, getattr(exc, "strerror", None) or exc))
        if not api_key or "\n" in api_key:
            raise StartupError("--api-key-file %s must hold the key on one line." % path)
    elif api_key:
        log.warning("--api-key on the command line is visible to every user of this machine (ps); prefer "
                    "NN_INTERACTIVE_API_KEY or --api-key-file.")
    api_key = api_key or os.environ.get("NN_INTERACTIVE_API_KEY") or None
    keys_file = os.path.abspath(os.path.expanduser(args.keys_file)) if args.keys_file else None
    try:
        identities = Identities(api_key, keys_file)
    except KeysFileError as exc:
        raise StartupError("%s." % exc)
    if keys_file and not identities.users():
        log.warning("the keys file %s names no user yet (nninteractive-slicer-server-keys add NAME, then kill -HUP)",
                    keys_file)
    elif keys_file and not any("operator" in identities.role_of(name) for name in identities.users()):
        log.info("no operator in %s: /metrics, /expire and the details of /x/info answer 403 to every key "
                 "(nninteractive-slicer-server-keys add NAME --role operator, or --role metrics for a scraper)",
                 keys_file)
    if identities.without_precheck():
        log.warning("the keys file's line(s) of %s carry no pre-check (check=): every guess at their tokens costs a "
                    "slow hash, and tells that the name exists; give them new tokens (add NAME --also, then remove "
                    "the old line)", ", ".join(identities.without_precheck()))
    if args.max_sessions_per_user and not identities.required:
        log.warning("--max-sessions-per-user without any key: every client is the same user, 'anonymous'.")
    return identities


def warn_exposure(args, identities):
    """Loud start-up warnings for what an operator should not run beyond loopback without knowing it."""
    if is_loopback_host(args.host):
        return
    if not identities.required:
        log.warning("!" * 78)
        log.warning("NO API KEY and listening on %s: anyone who reaches port %d can use this GPU and send images.",
                    args.host, args.port)
        log.warning("Set NN_INTERACTIVE_API_KEY (or --api-key-file, --keys-file) before exposing the server.")
        log.warning("!" * 78)
    elif identities.has_shared_key():
        log.warning("a SHARED key is served on %s: everyone who has it is the same user 'shared' (no per-user "
                    "limits, no session or download kept apart%s); give each person a token of their own "
                    "(--keys-file) and drop the shared key.", args.host,
                    "" if identities.keys_file else ", and each of them is an operator")
    if not args.ssl_certfile and not getattr(args, "forwarded_allow_ips", None):  # no balancer in front either
        log.warning("plain HTTP on %s: keys and images cross the network in the clear unless a TLS-terminating "
                    "balancer in front is the only way in (see README, TLS).", args.host)
    if args.agent_port and not is_loopback_host(args.agent_host):
        log.info("the agent-check (no key) listens on %s:%d: only the balancer should reach it", args.agent_host,
                 args.agent_port)


def check_device(name):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise StartupError("--device %r is not a device; use cuda, cuda:N, cpu or mps." % name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError("--device %s was asked for but no CUDA GPU is usable here; check the NVIDIA driver "
                               "(nvidia-smi), or start with --device cpu to try it (slowly) without a GPU." % name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise StartupError("--device %s does not exist: this machine has %d CUDA device(s)."
                               % (name, torch.cuda.device_count()))
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise StartupError("--device mps was asked for but Apple's MPS is not available here; use --device cpu.")
    return device


def check_registry(args):
    """The model registry (None without a spec), checked before the slow model load: an invalid spec stops the
    start-up with the file, the entry and the field. A model whose files are missing or broken is only marked
    unavailable (``Registry.check_models``): the server starts with the others."""
    from .auto.registry import SpecError, load_registry, spec_source

    path, where_from = spec_source(args.model_serve_spec)
    if path is None:
        if args.infer_root or args.orthanc_url:
            raise StartupError("--infer-root and --orthanc-url serve automatic models: give the model registry too "
                               "(--model-serve-spec PATH, MODEL_SERVE_SPEC or ./model-serve-spec.yaml).")
        if args.jobs_dir:  # a deployment names its jobs volume whether or not this node serves automatic models
            log.info("--jobs-dir %s is unused: no model registry (--model-serve-spec)", args.jobs_dir)
        return None
    try:
        registry = load_registry(path, check_files=False)
    except SpecError as exc:
        raise StartupError("the model registry is invalid: %s." % exc)
    log.info("model registry: %s (from %s)", registry.path, where_from)
    unavailable = registry.check_models()
    if unavailable and len(unavailable) == len(registry):
        log.error("none of the %d automatic model(s) of %s can serve (see above); interactive sessions work, and "
                  "/readyz answers 503 until a model's files are put right", len(registry), path)
    from .auto.paths import check_root

    for root in args.infer_root:
        try:
            check_root(root)
        except ValueError as exc:
            raise StartupError("%s." % exc)
    return registry


def make_auto(registry, engine, args, limits, budget):
    from .auto.predictors import AutoSegmenter
    from .auto.service import AutoService

    # The prompts' queue (automatic runs in pieces between prompts) and the sessions' memory budget
    segmenter = AutoSegmenter(registry, device=str(engine.device), queue=engine.queue, budget=budget,
                              cache_size=args.predictor_cache_size, ttl_s=args.predictor_ttl_seconds,
                              mem_timeout_s=args.gpu_memory_wait_seconds)
    jobs_dir = os.path.abspath(os.path.expanduser(args.jobs_dir)) if args.jobs_dir else None
    auto = AutoService(registry, segmenter, limits, args.infer_root, jobs_dir, budget=budget)
    auto.orthanc = check_orthanc(args)
    return auto


def check_orthanc(args):
    """The operator's Orthanc for /infer_orthanc (--orthanc-url, else $ORTHANC_URL), or None (the endpoint off)."""
    from .auto.orthanc import Orthanc

    try:
        orthanc = Orthanc.from_settings(args.orthanc_url)
    except ValueError as exc:
        raise StartupError("%s." % exc)
    log.info("/infer_orthanc: %s", "series from and DICOM SEGs to Orthanc %s" % orthanc.describe() if orthanc
             else "off (no --orthanc-url or ORTHANC_URL)")
    return orthanc


def main(argv=None):
    from .shutdown import HANGUP

    HANGUP.install()  # first: a SIGHUP (logrotate, systemctl reload) during start-up must not kill the server
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, json_lines=args.log_json, verbose=args.verbose)
    try:
        return serve(args)
    except StartupError as exc:
        print("nninteractive-slicer-server: %s" % exc, file=sys.stderr)
        return 2


def serve(args):
    check_args(args)
    check_tls(args)
    identities = check_keys(args)
    registry = check_registry(args)
    device = check_device(args.device)
    compile_ = not args.no_torch_compile and device.type == "cuda"
    if args.model_dir:
        model_dir, model_name = os.path.abspath(os.path.expanduser(args.model_dir)), None
    else:
        model_name, model_dir = resolve_official(args.model)
        args.fold = check_model_dir(model_dir, args.fold, args.checkpoint)
    warn_exposure(args, identities)

    from .engine import Engine

    try:
        engine = Engine(model_dir, args.fold, args.checkpoint, device, args.torch_n_threads, compile_,
                        do_autozoom=not args.no_autozoom, verbose=args.verbose, model_name=model_name)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise StartupError("Could not load the model from %s (%s: %s); check that it is an nnInteractive model "
                           "folder made for nnInteractive 2.6." % (model_dir, type(exc).__name__, exc))

    from .app import make_app
    from .connections import Guard, default_max_connections, raise_descriptor_limit
    from .limits import Limits, shared_budget
    from .shutdown import serve as serve_until_stopped

    limits = Limits.defaults(args.memory_budget, args.max_image_voxels, args.max_body_bytes)
    limits.max_waiting_per_lease = args.max_waiting_per_lease
    limits.max_upload_bytes, limits.max_unpacked_bytes = args.max_upload_bytes, args.max_unpacked_bytes
    limits.max_archive_files, limits.max_jobs, limits.job_ttl_s = (args.max_archive_files, args.max_jobs,
                                                                    args.job_ttl_seconds)
    limits.max_running_jobs = args.max_running_jobs
    limits.max_jobs_per_user = args.max_jobs_per_user or max(1, args.max_jobs // 4)
    limits.max_job_bytes_per_user = args.max_job_bytes_per_user or 2 * (args.max_upload_bytes +
                                                                          args.max_unpacked_bytes)
    limits.min_upload_rate, limits.upload_grace_s = args.min_upload_rate, args.upload_grace_seconds
    budget = shared_budget(limits, args.max_sessions, args.max_sessions_per_user)  # sessions and automatic runs
    auto = make_auto(registry, engine, args, limits, budget) if registry is not None else None
    app = make_app(engine, args.max_sessions, args.idle_timeout_seconds, args.liveness_timeout_seconds, limits=limits,
                   identities=identities, max_sessions_per_user=args.max_sessions_per_user, auto=auto,
                   agent_port=args.agent_port, agent_host=args.agent_host, budget=budget,
                   metrics_user_labels=args.metrics_user_labels)
    descriptors = raise_descriptor_limit()
    guard = Guard(args.header_timeout_seconds, args.max_connections or default_max_connections(descriptors),
                  args.max_connections_per_address, args.trusted_proxies)
    log.info("serving %s on %s://%s:%d (max %d session(s)%s, %s)", engine.model_name,
             "https" if args.ssl_certfile else "http", args.host, args.port, args.max_sessions,
             ", %d per user" % args.max_sessions_per_user if args.max_sessions_per_user else "", identities.describe())
    log.info("limits: %s; up to %d request(s) waiting per session", limits.describe(), limits.max_waiting_per_lease)
    log.info("connections: at most %d open (%d per client address), headers within %.0f s, idle ones closed after "
             "%.0f s, open-file limit %d; X-Forwarded-For believed from %s", guard.max_connections,
             guard.max_per_address, guard.header_timeout, args.keep_alive_seconds, descriptors,
             args.forwarded_allow_ips or "nobody")
    log.info("automatic models: %s", auto.describe() if auto is not None else "none (no --model-serve-spec)")
    try:
        serve_until_stopped(app, args.shutdown_deadline_seconds, guard=guard,
                            ssl_min_version=tls_version(args.ssl_min_version) if args.ssl_certfile else None,
                            forwarded_allow_ips=args.forwarded_allow_ips, host=args.host, port=args.port,
                            log_level=args.log_level, access_log=args.verbose, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, ssl_keyfile_password=args.ssl_keyfile_password,
                            timeout_keep_alive=args.keep_alive_seconds)
    finally:
        engine.shutdown()
    return 0


def list_models_main(argv=None):
    p = argparse.ArgumentParser(prog="nninteractive-slicer-server-models",
                                description="List the official nnInteractive models and which are downloaded.")
    p.parse_args(argv)
    from nnInteractive import model_management as mm

    try:
        models = mm.list_models()
    except (RuntimeError, ValueError) as exc:
        print("nninteractive-slicer-server-models: %s" % exc, file=sys.stderr)
        return 2
    for entry in models:
        print("%-40s %-12s %s" % (entry["id"] + (" (default)" if entry.get("default") else ""),
                                   "downloaded" if entry["downloaded"] else "-", entry.get("local_path") or ""))
    return 0


def download_main(argv=None):
    p = argparse.ArgumentParser(prog="nninteractive-slicer-server-download",
                                description="Download an official nnInteractive model ahead of serving it.")
    p.add_argument("model", nargs="?", help="model id (default: the manifest's default model)")
    a = p.parse_args(argv)
    try:
        model_id, path = resolve_official(a.model)
    except StartupError as exc:
        print("nninteractive-slicer-server-download: %s" % exc, file=sys.stderr)
        return 2
    print("%s is in %s" % (model_id, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
