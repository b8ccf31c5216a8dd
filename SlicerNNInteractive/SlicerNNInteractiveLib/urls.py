"""Server URLs: normalizing what a user typed, and telling whether a URL stays on this computer.

Standard library only, so the Slicer module can check a URL (and ask for consent) before the packages the
client needs (numpy, requests, blosc2) are installed.
"""

import ipaddress
import json
import os
import ssl
import urllib.request
from urllib.parse import urlsplit

DEFAULT_PORT = 1527
DEFAULT_URL = "http://127.0.0.1:%d" % DEFAULT_PORT


def normalize_url(url):
    """Return ``url`` as ``http(s)://host:port`` without a trailing slash, or raise ValueError saying why not."""
    url = (url or "").strip()
    if not url:
        raise ValueError("The server URL is empty. Enter one such as %s" % DEFAULT_URL)
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("The server URL must start with http:// or https://, not %s://" % parts.scheme)
    if not parts.hostname:
        raise ValueError("The server URL %r names no host. Enter one such as %s" % (url, DEFAULT_URL))
    try:
        parts.port
    except ValueError:
        raise ValueError("The port in the server URL %r is not a number between 1 and 65535" % url)
    return url.rstrip("/")


def is_loopback_host(host):
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_url(url):
    """True when the URL points at this computer (loopback), so no image leaves the machine."""
    return is_loopback_host(urlsplit(normalize_url(url)).hostname or "")


def answers_healthz(url, timeout=2.0, ca_bundle=None):
    """True when an nnInteractive server answers ``GET /healthz`` at ``url`` (no proxy for loopback); never
    raises. For checks made before the client's packages are installed. An https server's certificate is checked
    against ``ca_bundle`` (a PEM file), else $NN_INTERACTIVE_CA_BUNDLE, else the system's authorities."""
    try:
        url = normalize_url(url)
        handlers = [urllib.request.ProxyHandler({})] if is_local_url(url) else []
        if url.startswith("https://"):
            cafile = ca_bundle or os.environ.get("NN_INTERACTIVE_CA_BUNDLE") or None
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
        with urllib.request.build_opener(*handlers).open(url + "/healthz", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read().decode("utf-8")).get("ok") is True
    except Exception:
        return False
