"""A client for nnInteractive 2.6's remote protocol (our server or the official ``nninteractive-server``).

``RemoteSession`` has the public API of the official ``nnInteractiveRemoteInferenceSession`` (which itself
mirrors the in-process ``nnInteractiveInferenceSession``), so code written for either keeps working:

    import sys; sys.path.insert(0, "<repo>/SlicerNNInteractive")
    from SlicerNNInteractiveLib.client import RemoteSession
    with RemoteSession("http://gpu-node:1527", api_key="...") as s:
        s.set_image(image[None])                       # [c, x, y, z]
        s.set_target_buffer(mask)                      # uint8 [x, y, z], updated in place
        s.add_point_interaction((10, 20, 30), include_interaction=True)

An https server with a certificate from a private certificate authority: pass ``ca_bundle="ca.pem"`` (the CA's
certificate, PEM) or set ``NN_INTERACTIVE_CA_BUNDLE``; ``REQUESTS_CA_BUNDLE`` works too.

Needs only numpy, requests and blosc2. Errors are the typed ones of ``errors.py``. Every call records
``last_timing``: milliseconds spent encoding, in the HTTP exchange, decoding and writing, plus the
server's own phases when the server reports them, and the bytes sent and received.
"""

import json
import os
import re
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from . import protocol as P
from .compat import version_problem
from .errors import (
    BackendLostError,
    BadRequestError,
    IncompatibleServerError,
    NNInteractiveError,
    NotAServerError,
    ServerAtCapacityError,
    ServerCertificateError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    SessionExpiredError,
    UnauthorizedError,
)
from .wire import (
    IMAGE_CODEC,
    LOOPBACK_IMAGE_CODEC,
    MASK_CODEC,
    STREAM_CHUNK_BYTES,
    WireFormatError,
    pack_array,
    pack_chunks,
    unpack_array,
)
from .urls import DEFAULT_PORT, is_local_url, is_loopback_host, normalize_url  # noqa: F401 (re-exported)


def _detail(resp):
    """The server's explanation of an error response, or None when the body is not our JSON."""
    try:
        data = resp.json()
    except ValueError:
        return None
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return json.dumps(detail)
    return None


CA_BUNDLE_ENV = "NN_INTERACTIVE_CA_BUNDLE"


def _resolve_ca_bundle(ca_bundle, server_url):
    """What requests' ``verify`` gets: the CA bundle given, else $NN_INTERACTIVE_CA_BUNDLE, else requests' own
    $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE (read here because loopback connections ignore the environment, and
    because requests lets them override a session's ``verify``), else True (the bundle requests ships)."""
    if ca_bundle is True:
        return True
    source = "ca_bundle"
    if not ca_bundle:
        for name in (CA_BUNDLE_ENV, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            if os.environ.get(name):
                ca_bundle, source = os.environ[name], "$" + name
                break
        else:
            return True
    ca_bundle = os.path.expanduser(ca_bundle)
    if server_url.startswith("https://") and not os.access(ca_bundle, os.R_OK):
        raise ServerCertificateError(
            "The CA bundle %s (%s) does not exist or cannot be read. Give the PEM file holding the certificate of the "
            "authority that signed the server's certificate (ask the server's operator for it)." % (ca_bundle, source))
    return ca_bundle


def _looks_like_json(resp):
    return resp.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _draining(resp):
    try:
        return resp.json().get("draining") is True
    except (ValueError, AttributeError):
        return False


def _cause(exc):
    """The innermost reason of a requests exception, in a few words (``ConnectionResetError``, ``RemoteDisconnected``,
    ``IncompleteRead``...)."""
    seen = exc
    for _ in range(8):
        inner = seen.args[-1] if seen.args and isinstance(seen.args[-1], BaseException) else None
        inner = inner or getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    return type(seen).__name__


GATEWAY_CODES = (502, 503, 504)  # what a proxy or balancer answers when the server behind it failed
GATEWAY_REASONS = {  # what each of them means for the user
    502: "the server behind it gave no valid answer: it is down or restarting, or it speaks another protocol than "
         "the proxy expects (https behind a proxy set up for http, or the other way round)",
    503: "it has no server available behind it (all down, draining or full)",
    504: "the server behind it did not answer within the proxy's time limit (the proxy's timeout is shorter than "
         "the request: an image upload, a prediction waiting for the GPU, an automatic model)",
}


class _Http:
    """HTTP to one server, translating every failure into a typed error with a readable message. One connection
    (pool) per instance, used by one thread at a time; ``companion()`` makes another on the same server with the
    same headers and cookies (a balancer's sticky-session cookie included).

    A request of a session (it carries the lease header; the claim does not) whose connection is refused, dropped or
    reset, or that a balancer answers 502 / 503 / 504 without our server's JSON, raises ``BackendLostError``: the
    server holding the session is gone, and the caller recovers on a new session (``sync.SyncedSession``)."""

    def __init__(self, server_url, api_key, connect_timeout, read_timeout, ca_bundle=None):
        import requests  # imported here so that importing this module stays free

        self._requests = requests
        self.server_url = normalize_url(server_url)
        self.verify = _resolve_ca_bundle(ca_bundle, self.server_url)  # passed on every request, see _resolve_ca_bundle
        if api_key is None:
            api_key = os.environ.get("NN_INTERACTIVE_API_KEY")
        self._session = requests.Session()
        if is_local_url(self.server_url):
            # A proxy from the environment cannot reach this computer's loopback: never use one here.
            self._session.trust_env = False
        if api_key:
            self._session.headers["Authorization"] = "Bearer " + api_key
        self.headers = self._session.headers
        self._timeout = (connect_timeout, read_timeout)

    def companion(self):
        other = _Http(self.server_url, None, *self._timeout, ca_bundle=self.verify)
        other._session.trust_env = self._session.trust_env
        other._session.headers.update(self._session.headers)
        other._session.cookies = self._session.cookies  # one jar, shared
        return other

    def call(self, method, path, data=None, meta=None, timeout=None, json_type=False):
        headers = {"Content-Type": "application/json"} if json_type else {}
        if meta is not None:
            headers[P.META_HEADER] = json.dumps(meta, separators=(",", ":"))
            headers["Content-Type"] = P.OCTET_STREAM
        url = self.server_url + path
        of_session = path != P.PATH_CLAIM and bool(self._session.headers.get(P.LEASE_HEADER))
        try:
            resp = self._session.request(method, url, data=data, headers=headers, timeout=timeout or self._timeout,
                                         verify=self.verify)
        except self._requests.exceptions.SSLError as exc:
            raise self._tls_error(exc)
        except self._requests.exceptions.ConnectTimeout:
            raise ServerUnreachableError(
                "Could not connect to %s within %.0f s. Check the URL, that the server is running, and any "
                "firewall or VPN in between." % (self.server_url, self._timeout[0]))
        except self._requests.exceptions.Timeout:
            raise ServerTimeoutError(
                "The server at %s did not answer %s in time. It may be busy or overloaded; try again, or raise "
                "the timeout." % (self.server_url, path))
        except self._requests.exceptions.ProxyError as exc:
            raise ServerUnreachableError(
                "A proxy refused the connection to %s (%s). Add the server's host to NO_PROXY or unset "
                "HTTP_PROXY/HTTPS_PROXY." % (self.server_url, exc))
        except (self._requests.exceptions.ConnectionError, self._requests.exceptions.ChunkedEncodingError) as exc:
            if of_session:
                raise BackendLostError(
                    "The connection to the server at %s broke during %s (%s): the server holding this session stopped "
                    "or restarted." % (self.server_url, path, _cause(exc)))
            if self.server_url.startswith("http://") and "RemoteDisconnected" in str(exc):
                raise ServerUnreachableError(
                    "Something at %s closed the connection without an answer. If the server serves https (started "
                    "with --ssl-certfile), the URL must start with https://." % self.server_url)
            raise ServerUnreachableError(
                "Cannot reach an nnInteractive server at %s: is it running, and are the host and port right? "
                "(%s)" % (self.server_url, exc.__class__.__name__))
        self._raise_for_status(resp, path, of_session)
        return resp

    def _tls_error(self, exc):
        text = str(exc)
        host = urlsplit(self.server_url).hostname
        given = (" with the CA bundle %s" % self.verify) if isinstance(self.verify, str) else ""
        found = re.search(r"certificate verify failed: ([^(]*)", text)
        if found is None and "CERTIFICATE_VERIFY_FAILED" not in text:
            if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
                return ServerCertificateError(
                    "%s does not answer https: it probably serves plain HTTP. Try http://%s instead."
                    % (self.server_url, self.server_url.split("://", 1)[1]))
            return ServerCertificateError(
                "The TLS connection to %s failed (%s). Check that the server serves https on that port."
                % (self.server_url, text[-200:]))
        reason = found.group(1).strip().rstrip(".") if found else "certificate verify failed"
        if "mismatch" in reason.lower():
            return ServerCertificateError(
                "The TLS certificate of %s is not made for the host name %s (%s). Connect with a host name the "
                "certificate names (ask the server's operator), or have the certificate remade to include %s."
                % (self.server_url, host, reason, host))
        return ServerCertificateError(
            "The TLS certificate of %s could not be verified%s (%s). If the server uses a private certificate "
            "authority, give its CA certificate (a PEM file): ca_bundle=PATH in scripts, the %s environment "
            "variable, or the module's CA bundle setting in Slicer. Also check the host name in the URL and this "
            "computer's clock." % (self.server_url, given, reason, CA_BUNDLE_ENV))

    def _raise_for_status(self, resp, path, of_session=False):
        code = resp.status_code
        if code < 400:
            if path != P.PATH_HEALTHZ and resp.content[:1] == b"<":
                raise NotAServerError(
                    "%s answered with a web page, not an nnInteractive server response. A proxy or another web "
                    "application is in the way: check the URL and port, or set NO_PROXY." % self.server_url)
            return
        detail = _detail(resp)
        ours = detail is not None and _looks_like_json(resp)
        if code == 503 and path == P.PATH_HEALTHZ and _looks_like_json(resp) and _draining(resp):
            raise ServerUnreachableError("The server at %s is shutting down (it takes no new session). Try again in "
                                         "a moment." % self.server_url)
        if code in GATEWAY_CODES and not ours:  # our server never answers 502 / 504, and its 503s carry its JSON
            if of_session:
                raise BackendLostError(
                    "A proxy or load balancer in front of %s answered HTTP %d to %s: %s. This session's server is "
                    "lost; the module continues on a new one." % (self.server_url, code, path, GATEWAY_REASONS[code]))
            if code != 503 or path != P.PATH_CLAIM:
                raise ServerUnreachableError(
                    "A proxy or load balancer at %s answered HTTP %d to %s: %s. Try again in a moment; if it persists, "
                    "ask the operator." % (self.server_url, code, path, GATEWAY_REASONS[code]))
        if code == 401:
            raise UnauthorizedError(
                "The server refused the API key (%s). Enter the key the server was started with "
                "(--api-key or NN_INTERACTIVE_API_KEY)." % (detail or "unauthorized"))
        if code == 410:
            raise SessionExpiredError(
                "The server no longer knows this session (%s): it timed out or the server restarted."
                % (detail or "lease expired"))
        if code == 503 and path == P.PATH_CLAIM:
            retry = resp.headers.get("Retry-After")
            mine = "--max-sessions-per-user" in (detail or "")  # this user's own sessions, not everyone's
            when = "in %s s" % retry if retry else "later"
            raise ServerAtCapacityError(
                ("You hold as many sessions as this server allows one user (%s). Close one (another Slicer or script "
                 "of yours), or try again %s." if mine else
                 "The server is serving its maximum number of users (%s). Try again %s, or ask its operator to "
                 "raise --max-sessions.") % (detail or "at capacity", when) if ours else
                "A proxy or load balancer at %s answered HTTP 503 to %s: %s. Try again %s; if it persists, ask the "
                "operator." % (self.server_url, path, GATEWAY_REASONS[503], when),
                retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
        if code == 404 and path in (P.PATH_HEALTHZ, P.PATH_CLAIM, P.PATH_CAPABILITIES):
            raise NotAServerError(_not_found(self.server_url, path))
        if not ours:
            page = resp.content[:1] == b"<" or "html" in resp.headers.get("content-type", "")
            raise NotAServerError(
                "%s answered HTTP %d to %s %s, not like an nnInteractive server. Check the URL (host, port and "
                "path), and any proxy in between (NO_PROXY)." % (self.server_url, code, path,
                                                                   "with a web page" if page else "in another format"))
        if code < 500:
            raise BadRequestError("The server refused the request: %s" % detail, status_code=code)
        raise ServerError("The server failed (HTTP %d): %s" % (code, detail))

    def get_quietly(self, path, timeout):
        """Status code of a GET, or None when nothing answered; never raises."""
        try:
            return self._session.get(self.server_url + path, timeout=timeout, verify=self.verify).status_code
        except self._requests.exceptions.RequestException:
            return None

    def post_quietly(self, path, timeout):
        try:
            self._session.post(self.server_url + path, timeout=timeout, verify=self.verify)
        except Exception:
            pass

    def close(self):
        self._session.close()


class RemoteSession:
    """One leased session on an nnInteractive server; see the module docstring."""

    def __init__(self, server_url, api_key=None, connect_timeout=5.0, read_timeout=60.0, upload_timeout=600.0,
                 heartbeat=True, ca_bundle=None):
        self._http = _Http(server_url, api_key, connect_timeout, read_timeout, ca_bundle=ca_bundle)
        self.server_url = self._http.server_url
        self._upload_timeout = (connect_timeout, upload_timeout)
        self.image_codec = dict(IMAGE_CODEC)  # settable; see _choose_image_codec
        self._lease_token = None
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread = None
        self._beat = None  # the heartbeat's own connection: a beat never waits behind an upload or a prediction
        self._queue_unsupported = False  # set when the server has no /x/queue (the official one)
        self.last_timing = {}
        self.last_region = None
        self._last_paste_bbox = None
        self.target_buffer = None
        self.original_image_shape = None
        self._server_info = None  # see server_info

        claim = self._http.call("POST", P.PATH_CLAIM).json()
        self._lease_token = claim["lease_token"]
        self._http.headers[P.LEASE_HEADER] = self._lease_token
        self.idle_timeout_seconds = float(claim.get("idle_timeout_seconds", 0.0))
        self.liveness_timeout_seconds = float(claim.get("liveness_timeout_seconds", 0.0))
        # Servers behind a balancer may pin a session with a cookie set at claim time; requests keeps it.

        caps = self._http.call("GET", P.PATH_CAPABILITIES).json()
        problem = version_problem(caps.get("inference_session_version"), self.server_url)
        if problem is not None:
            self.close(wait=True)  # the lease is back before the caller hears why: it may try another server at once
            raise IncompatibleServerError(problem)
        self.capabilities = caps
        self.supported_interactions = caps["supported_interactions"]
        self.channel_mapping = {k: tuple(v) if isinstance(v, list) else v for k, v in caps["channel_mapping"].items()}
        self.num_interaction_channels = caps["num_interaction_channels"]
        self.supports_initial_label = caps["supports_initial_label"]
        self.supports_zero_shot_label_refinement = caps["supports_zero_shot_label_refinement"]
        self.preferred_scribble_thickness = caps["preferred_scribble_thickness"]
        self.interaction_decay = caps["interaction_decay"]
        self.INFERENCE_SESSION_VERSION = caps["inference_session_version"]
        self.license = caps.get("license")
        self.supports_undo = bool(caps.get("supports_undo", False))
        self.do_autozoom = bool(caps.get("do_autozoom", True))

        self._choose_image_codec()

        if heartbeat and self.liveness_timeout_seconds > 0:
            self._beat = self._http.companion()
            interval = max(0.2, self.liveness_timeout_seconds / 3.0)
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, args=(interval,), name="nninteractive-heartbeat", daemon=True)
            self._heartbeat_thread.start()

    def _choose_image_codec(self):
        """Images to a server on this computer go stored, not compressed (wire.LOOPBACK_IMAGE_CODEC). A loopback
        URL is not enough (an SSH tunnel is one too, with a network behind it): our server must also report this
        computer's machine id. Anything else (another machine, an official server) gets compressed images."""
        if not is_local_url(self.server_url):
            return
        try:
            info = self._http.call("GET", P.PATH_SERVER_INFO).json()
        except (NNInteractiveError, ValueError):
            return  # not our server: keep compressing
        if isinstance(info, dict) and info.get("machine") == P.machine_id():
            self.image_codec = dict(LOOPBACK_IMAGE_CODEC)

    @property
    def server_info(self):
        """Our server's ``/x/info`` (``model``, ``version``, ``device``...), asked once; None from a server without it
        (the official one) or when it could not be read."""
        if self._server_info is None:
            try:
                info = self._http.call("GET", P.PATH_SERVER_INFO).json()
            except (NNInteractiveError, ValueError):
                info = None
            self._server_info = info if isinstance(info, dict) else False
        return self._server_info or None

    # ------------------------------------------------------------------ transport

    def _post_array(self, path, arr, meta, codec, timeout=None):
        t0 = time.perf_counter()
        body = pack_array(arr, **codec)
        t1 = time.perf_counter()
        sent_at = time.time()
        resp = self._http.call("POST", path, data=body, meta=meta, timeout=timeout)
        t2 = time.perf_counter()
        self._record_timing(resp, encode=t1 - t0, exchange=t2 - t1, sent=len(body), sent_at=sent_at)
        return resp

    def _stream_array(self, path, arr, meta, codec, timeout=None):
        """Like ``_post_array`` for large arrays: each chunk is sent as soon as it is compressed, and the server
        decompresses it while the next one is compressed (a chunked request; any server reads it)."""
        if arr.nbytes < 2 * STREAM_CHUNK_BYTES:
            return self._post_array(path, arr, meta, codec, timeout)
        spent = {"encode": 0.0, "sent": 0}

        def pieces():
            chunks = pack_chunks(arr, chunk_bytes=STREAM_CHUNK_BYTES, **codec)
            while True:
                t = time.perf_counter()
                piece = next(chunks, None)
                spent["encode"] += time.perf_counter() - t
                if piece is None:
                    return
                spent["sent"] += len(piece)
                yield piece

        sent_at = time.time()
        t0 = time.perf_counter()
        resp = self._http.call("POST", path, data=pieces(), meta=meta, timeout=timeout)
        total = time.perf_counter() - t0
        self._record_timing(resp, encode=spent["encode"], exchange=total - spent["encode"], sent=spent["sent"],
                            sent_at=sent_at)
        return resp

    def _post_json(self, path, payload, timeout=None):
        t0 = time.perf_counter()
        body = json.dumps(payload, separators=(",", ":")).encode()
        t1 = time.perf_counter()
        sent_at = time.time()
        resp = self._http.call("POST", path, data=body, meta=None, json_type=True, timeout=timeout)
        self._record_timing(resp, encode=t1 - t0, exchange=time.perf_counter() - t1, sent=len(body), sent_at=sent_at)
        return resp

    def _record_timing(self, resp, encode, exchange, sent, sent_at=None):
        timing = {"encode_ms": encode * 1e3, "exchange_ms": exchange * 1e3, "decode_ms": 0.0, "write_ms": 0.0,
                  "bytes_sent": sent, "bytes_received": len(resp.content), "sent_at": sent_at}
        server = resp.headers.get(P.TIMING_HEADER)
        if server:
            try:
                timing.update({"server_" + k: float(v) for k, v in json.loads(server).items()})
            except (ValueError, AttributeError):
                pass
        self.last_timing = timing

    def _apply_prediction(self, resp):
        """Decode a prediction response; write its region into target_buffer. Returns ran_prediction."""
        self._last_paste_bbox = None
        self.last_region = None
        meta_raw = resp.headers.get(P.META_HEADER)
        if meta_raw is None:
            raise NotAServerError("%s sent a prediction without its %s header; is this an nnInteractive server?"
                                  % (self.server_url, P.META_HEADER))
        meta = json.loads(meta_raw)
        ran = bool(meta.get("ran_prediction", False))
        bbox = meta.get("bbox")
        if not ran or bbox is None:
            return ran
        self._last_paste_bbox = [[int(lo), int(hi)] for lo, hi in bbox]
        if not resp.content:
            return ran
        t0 = time.perf_counter()
        try:
            region = unpack_array(resp.content)
        except WireFormatError as exc:
            raise NotAServerError("The server's answer could not be decoded (%s)." % exc)
        expected = tuple(hi - lo for lo, hi in self._last_paste_bbox)
        if region.shape != expected:
            raise NotAServerError("The server sent a region of shape %s for a box of shape %s."
                                  % (region.shape, expected))
        t1 = time.perf_counter()
        self.last_region = region
        if self.target_buffer is not None:
            self.target_buffer[tuple(slice(lo, hi) for lo, hi in self._last_paste_bbox)] = region
        t2 = time.perf_counter()
        self.last_timing["decode_ms"] = (t1 - t0) * 1e3
        self.last_timing["write_ms"] = (t2 - t1) * 1e3
        return ran

    # ------------------------------------------------------------------ public API (official names)

    def initialize_from_trained_model_folder(self, *args, **kwargs):
        """No-op: the server loaded its model at start-up (kept for API compatibility)."""

    def set_image(self, image, image_properties=None):
        image = np.asarray(image)
        if image.ndim != 4:
            raise ValueError("expected a 4D image [c, x, y, z], got %dD with shape %s" % (image.ndim, image.shape))
        meta = {"image_properties": _jsonable(image_properties or {})}
        resp = self._stream_array(P.PATH_SET_IMAGE, image, meta, self.image_codec, timeout=self._upload_timeout)
        self.original_image_shape = tuple(resp.json()["original_image_shape"])
        self.target_buffer = None

    def set_target_buffer(self, target_buffer):
        self.target_buffer = target_buffer
        self._post_json(P.PATH_SET_TARGET_BUFFER,
                        {"shape": list(target_buffer.shape), "dtype": str(np.dtype(target_buffer.dtype))})

    def declare_target_buffer(self, shape, dtype="uint8"):
        """Like set_target_buffer, but keep no local buffer: results stay in ``last_bbox`` / ``last_region`` for the
        caller to merge itself (the Slicer module merges under Segment Editor masking rules)."""
        self.target_buffer = None
        self._post_json(P.PATH_SET_TARGET_BUFFER, {"shape": [int(d) for d in shape], "dtype": str(np.dtype(dtype))})

    @property
    def last_bbox(self):
        """Half-open box ``[[lo, hi]] * 3`` of the region the last prediction or undo changed, or None."""
        return self._last_paste_bbox

    def set_do_autozoom(self, do_autozoom):
        self.do_autozoom = bool(do_autozoom)
        self._post_json(P.PATH_SET_DO_AUTOZOOM, {"do_autozoom": bool(do_autozoom)})

    def reset_interactions(self):
        if self.target_buffer is not None:
            self.target_buffer.fill(0)
        self._post_json(P.PATH_RESET_INTERACTIONS, {})

    def undo(self):
        return self._apply_prediction(self._post_json(P.PATH_UNDO, {}))

    def _predict(self, force_full_refine=False):
        ran = self._apply_prediction(self._post_json(P.PATH_PREDICT, {"force_full_refine": bool(force_full_refine)}))
        return self._last_paste_bbox if ran else None

    def add_point_interaction(self, coordinates, include_interaction, run_prediction=True,
                              override_capability_checks=False):
        resp = self._post_json(P.PATH_ADD_POINT, {
            "coordinates": [float(c) for c in coordinates], "include_interaction": bool(include_interaction),
            "run_prediction": bool(run_prediction), "override_capability_checks": bool(override_capability_checks)})
        self._apply_prediction(resp)
        return self._last_paste_bbox

    def add_bbox_interaction(self, bbox_coords, include_interaction, run_prediction=True,
                             override_capability_checks=False):
        resp = self._post_json(P.PATH_ADD_BBOX, {
            "bbox_coords": [[int(lo), int(hi)] for lo, hi in bbox_coords],
            "include_interaction": bool(include_interaction), "run_prediction": bool(run_prediction),
            "override_capability_checks": bool(override_capability_checks)})
        self._apply_prediction(resp)
        return self._last_paste_bbox

    def add_scribble_interaction(self, scribble_image, include_interaction, run_prediction=True,
                                 override_capability_checks=False, interaction_bbox=None):
        return self._add_mask(P.PATH_ADD_SCRIBBLE, scribble_image, include_interaction, run_prediction,
                              override_capability_checks, interaction_bbox)

    def add_lasso_interaction(self, lasso_image, include_interaction, run_prediction=True,
                              override_capability_checks=False, interaction_bbox=None):
        return self._add_mask(P.PATH_ADD_LASSO, lasso_image, include_interaction, run_prediction,
                              override_capability_checks, interaction_bbox)

    def _add_mask(self, path, mask, include_interaction, run_prediction, override_capability_checks, interaction_bbox):
        meta = {"include_interaction": bool(include_interaction), "run_prediction": bool(run_prediction),
                "override_capability_checks": bool(override_capability_checks),
                "interaction_bbox": None if interaction_bbox is None
                else [[int(lo), int(hi)] for lo, hi in interaction_bbox]}
        self._apply_prediction(self._post_array(path, np.asarray(mask), meta, MASK_CODEC))
        return self._last_paste_bbox

    def add_initial_seg_interaction(self, initial_seg, run_prediction=False, override_capability_checks=False):
        initial_seg = np.asarray(initial_seg)
        meta = {"run_prediction": bool(run_prediction), "override_capability_checks": bool(override_capability_checks)}
        resp = self._post_array(P.PATH_ADD_INITIAL_SEG, initial_seg, meta, MASK_CODEC)
        # Like the in-process session, the buffer now holds the initial segmentation.
        if self.target_buffer is not None and self.target_buffer is not initial_seg:
            self.target_buffer[...] = initial_seg
        self._apply_prediction(resp)
        return self._last_paste_bbox

    # ------------------------------------------------------------------ automatic models (our server only)

    def list_models(self):
        """The server's automatic (nnU-Net) models, from ``GET /model_info``: a list of dicts with ``id``, ``name``,
        ``aliases``, ``labels`` (``value``, ``name``, ``color`` RGB 0-255, ``terminology`` when coded),
        ``default_args``, ``license``...; ``[]`` when our server serves none; None when the server has no such
        endpoint (an official nninteractive-server)."""
        return _models(self._http)

    def auto_segment(self, model, spacing=None, **fields):
        """Run the server's automatic model ``model`` (id, alias or name) on this session's image (the one sent with
        set_image: nothing is uploaded again). ``spacing``: the voxel spacing per array axis, needed when set_image
        had no ``image_properties={"spacing": [...]}``; ``fields``: ``use_folds``, ``tta``, ``checkpoint_name``,
        ``class_idx``, ``proba_threshold``, ``min_confidence``.

        Returns ``(bbox, region, labels, timings)``: the half-open box ``[[lo, hi]] * 3`` holding every labelled
        voxel and the label array inside it (both None when the model found nothing), ``labels`` (one dict per label
        value present: ``value``, ``name``, ``color``, ``terminology`` when coded, ``voxels``), and ``timings`` in
        seconds (the server's ``queue``, ``predict``, ``preprocess``, ``postprocess``, ``total``...; ``exchange``
        and ``decode`` here). The target buffer is not touched: send a label back as the initial segmentation
        (``add_initial_seg_interaction(full == value)``) to refine it with prompts."""
        payload = dict(fields, model=model)
        if spacing is not None:
            payload["spacing"] = [float(s) for s in spacing]
        try:
            # A whole-volume model may run for minutes (on a CPU, or behind others in the GPU queue).
            resp = self._post_json(P.PATH_AUTO_SEGMENT, _jsonable(payload), timeout=self._upload_timeout)
        except BadRequestError as exc:
            if exc.status_code == 404:
                why = ("it is not nninteractive-slicer-server (an official nnInteractive server has no automatic "
                       "models)" if str(exc).endswith("Not Found") else str(exc))
                raise BadRequestError("The server at %s cannot run automatic models: %s" % (self.server_url, why),
                                      status_code=404)
            raise
        raw = resp.headers.get(P.META_HEADER)
        if raw is None:
            raise NotAServerError("%s answered auto_segment without its %s header." % (self.server_url, P.META_HEADER))
        meta = json.loads(raw)
        timings = dict(meta.get("timings") or {})
        timings["exchange"] = self.last_timing.get("exchange_ms", 0.0) / 1e3
        bbox, region = meta.get("bbox"), None
        if bbox is not None and resp.content:
            t0 = time.perf_counter()
            try:
                region = unpack_array(resp.content)
            except WireFormatError as exc:
                raise NotAServerError("The server's answer could not be decoded (%s)." % exc)
            bbox = [[int(lo), int(hi)] for lo, hi in bbox]
            if region.shape != tuple(hi - lo for lo, hi in bbox):
                raise NotAServerError("The server sent a region of shape %s for a box %s." % (region.shape, bbox))
            timings["decode"] = time.perf_counter() - t0
        else:
            bbox = None
        return bbox, region, list(meta.get("labels") or []), timings

    def cancel_auto_segment(self, timeout=10.0):
        """Ask the server to stop this session's automatic run in progress (``POST /x/auto_segment/cancel``); the
        thread waiting in ``auto_segment`` then gets a BadRequestError with status 409. Sent on a connection of its
        own (that thread's connection is busy with the run). Returns True when a run was stopped, False when none was
        running, None when the server cannot (an official server, or ours before it could) or the session is closed;
        raises the typed errors otherwise."""
        if self._lease_token is None:
            return None
        http = self._http.companion()
        try:
            resp = http.call("POST", P.PATH_AUTO_CANCEL, data=b"{}", json_type=True,
                             timeout=(self._http._timeout[0], timeout))
        except BadRequestError as exc:
            if exc.status_code in (404, 405):
                return None
            raise
        except NotAServerError:  # a 404 that is not JSON
            return None
        finally:
            http.close()
        return bool(resp.json().get("cancelled"))

    # ------------------------------------------------------------------ lifecycle

    def ping(self, timeout=5.0):
        """True when the server answers its health check; never raises."""
        return self._http.get_quietly(P.PATH_HEALTHZ, timeout) == 200

    def heartbeat(self):
        """Prove liveness (does not postpone the idle timeout). Returns seconds left before the idle timeout.
        Safe to call while another thread's request is in progress (it has its own connection)."""
        http = self._beat or self._http
        return float(http.call("POST", P.PATH_HEARTBEAT).json().get("remaining_seconds", 0.0))

    def lease_status(self):
        """``{"remaining_seconds", "idle_timeout_seconds"}``; touches no clock on the server."""
        return self._http.call("GET", P.PATH_LEASE_STATUS).json()

    def queue_position(self, timeout=2.0):
        """Where this session's prediction stands in the server's GPU queue, asked on the heartbeat's connection
        (so while a prompt is in progress on the main one): ``{"ahead": N, "expected_wait_seconds": S or None,
        "running": bool, "waiting": bool, "queued": M}``. None when unknown: a server without it (the official
        one), no heartbeat connection, a closed session, or any error. Never raises."""
        http = self._beat
        if http is None or self._lease_token is None or self._queue_unsupported:
            return None
        try:
            return http.call("GET", P.PATH_QUEUE, timeout=(self._http._timeout[0], timeout)).json()
        except BadRequestError as exc:
            if exc.status_code in (404, 405):
                self._queue_unsupported = True  # not our server: never ask again
            return None
        except NotAServerError:  # an official server's 404 may not be JSON
            self._queue_unsupported = True
            return None
        except Exception:
            return None

    def _heartbeat_loop(self, interval):
        while not self._stop_heartbeat.wait(interval):
            try:
                self.heartbeat()
            except BackendLostError:
                continue  # the next action finds out and recovers; a restarted balancer may answer the next beat
            except SessionExpiredError:
                return
            except NNInteractiveError:
                continue  # a blip: the liveness timeout tolerates missed beats
            except Exception:
                return

    def close(self, wait=False):
        """Stop the heartbeat and release the lease; idempotent, never raises. Returns at once: the release is sent
        from a background thread (best effort: an unreleased lease expires after the liveness timeout), unless
        ``wait`` is true."""
        self._stop_heartbeat.set()
        self._heartbeat_thread = None
        token, self._lease_token = self._lease_token, None
        http, beat = self._http, self._beat
        self._beat = None

        def release():
            try:
                if token is not None:
                    releaser = http.companion()  # not the main connection: a request may still be in flight there
                    releaser.post_quietly(P.PATH_RELEASE, timeout=(2.0, 5.0))
                    releaser.close()
            finally:
                http.close()
                if beat is not None:
                    beat.close()

        if wait:
            release()
        else:
            threading.Thread(target=release, name="nninteractive-release", daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(wait=True)  # a script that ends its session expects the slot to be free

    def __del__(self):
        try:
            if self._lease_token is not None:
                self.close()
        except Exception:
            pass


def _not_found(server_url, path):
    """Why a server answers 404 to a path every nnInteractive server has."""
    prefix = urlsplit(server_url).path
    if prefix:
        return ("%s answered 404 Not Found to %s: no nnInteractive server answers under the path %s. nnInteractive "
                "servers answer at the root (%s): remove %s from the URL, unless a proxy maps it." % (
                    server_url, path, prefix, server_url[:-len(prefix)], prefix))
    return ("%s answered 404 Not Found to %s: what listens there is not an nnInteractive server (another web "
            "application, or a server of another protocol). Check the host and port." % (server_url, path))


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _models(http):
    """``list_models``'s answer over ``http`` (an ``_Http``)."""
    try:
        info = http.call("GET", P.PATH_MODEL_INFO).json()
    except BadRequestError as exc:
        if exc.status_code == 404:
            return None
        raise
    except NotAServerError:
        return None
    except ValueError:
        raise NotAServerError("%s answered /model_info with something that is not JSON." % http.server_url)
    if not isinstance(info, dict):
        raise NotAServerError("%s answered /model_info with %s, not a JSON object."
                              % (http.server_url, type(info).__name__))
    return [dict(v, id=v.get("id", k)) if isinstance(v, dict) else {"id": k} for k, v in info.items()]


def check_server(server_url, api_key=None, timeout=5.0, ca_bundle=None):
    """Describe the server at ``server_url`` for a "Test connection" button, or raise a typed error saying why not.

    Returns a dict with ``version``, ``model``, ``license``, ``supported_interactions``, ``models`` (automatic ones)
    and more. Works with the official server too (which lacks our ``/x/info``; its capabilities are used then).
    Claims no session.
    ``ca_bundle`` as for ``RemoteSession``.
    """
    http = _Http(server_url, api_key, timeout, timeout, ca_bundle=ca_bundle)
    try:
        health = http.call("GET", P.PATH_HEALTHZ)
        if not _looks_like_json(health) or health.json().get("ok") is not True:
            raise NotAServerError(
                "%s answered %s, not like an nnInteractive server: a proxy or another web application is in the way. "
                "Check the URL (host, port and path), and set NO_PROXY for the server's host if a proxy intercepts it."
                % (http.server_url, "with a web page" if health.content[:1] == b"<" else "in another format"))
        caps = http.call("GET", P.PATH_CAPABILITIES).json()
        problem = version_problem(caps.get("inference_session_version"), http.server_url)
        if problem is not None:
            raise IncompatibleServerError(problem)
        info = {"server": "nninteractive-server (official)", "model": None,
                "version": caps.get("inference_session_version")}
        try:
            info.update(http.call("GET", P.PATH_SERVER_INFO).json())
        except NotAServerError:
            pass  # the official server has no /x/info
        info.setdefault("license", caps.get("license"))
        info["supported_interactions"] = [k for k, v in caps.get("supported_interactions", {}).items() if v]
        info["preferred_scribble_thickness"] = caps.get("preferred_scribble_thickness")
        info["supports_undo"] = caps.get("supports_undo", False)
        info["models"] = _models(http)  # automatic models (None: a server without them)
        return info
    finally:
        http.close()
