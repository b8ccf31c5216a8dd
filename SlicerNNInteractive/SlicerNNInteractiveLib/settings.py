"""The server the module talks to, as the user configured it, and the consent policy: decided here, without Qt.

The widget hands in ``read(name, default)`` and ``write(name, value)`` on its settings store (Slicer: QSettings under
``SlicerNNInteractive/``) and ``ask(question)`` (a Yes / No dialog). Standard library only (``urls.py``), so that the
consent box and the URL work before the client's packages are installed.

Consent: Slicer's extension catalog requires explicit consent before data leaves the computer. A server on this
computer (a loopback URL) needs none; any other is asked about once, and the answer is kept per server URL.
"""

from .urls import DEFAULT_URL, is_local_url, normalize_url

MAX_REPLAY_SERVERS = 10

CONSENT_QUESTION = (
    "nnInteractive sends the volume you segment (and your segment) to the server at\n\n    %s\n\n"
    "for processing. This server is not on this computer. Only send data you may share with it.\n\n"
    "Allow sending images to this server? (You can change this in the Configuration tab.)")


class ServerSettings(object):
    """``url`` (normalized), ``api_key`` and ``ca_bundle`` (None when empty) as stored; ``update`` stores what the
    user typed."""

    def __init__(self, read, write):
        self.read, self.write = read, write

    @property
    def url(self):
        return normalize_url(self.read("ServerURL", DEFAULT_URL) or DEFAULT_URL)

    @property
    def api_key(self):
        return (self.read("APIKey", "") or "").strip() or None

    @property
    def ca_bundle(self):
        """PEM file of a private certificate authority for an https server (None: the system's authorities, or
        $NN_INTERACTIVE_CA_BUNDLE)."""
        return (self.read("CABundle", "") or "").strip() or None

    def update(self, url_text, api_key, ca_bundle):
        """Store what the user typed. Returns ``(url, changed)``: the normalized URL (to show back) and whether the
        server, key or authority differ from before (then the old session and the old server's models go).
        Raises ValueError, saying why, for a URL that cannot be one (nothing is stored then)."""
        url = normalize_url((url_text or "").strip() or DEFAULT_URL)
        values = (("ServerURL", url, DEFAULT_URL), ("APIKey", (api_key or "").strip(), ""),
                  ("CABundle", (ca_bundle or "").strip(), ""))
        changed = any(value != (self.read(name, default) or default) for name, value, default in values)
        for name, value, _ in values:
            self.write(name, value)
        return url, changed

    # ------------------------------------------------------------------ servers to replay a segment's prompts on
    def _list(self, name):
        value = self.read(name, [])  # QSettings gives one string for a list of one
        if isinstance(value, str):
            value = [value] if value else []
        return list(value or [])

    def replay_servers(self):
        """The servers offered for "Replay on another model or server": those replayed on before (latest first),
        then the configured one and those the user consented to, each once."""
        servers = []
        for url in self._list("ReplayServers") + [self.url] + self.consented():
            if url and url not in servers:
                servers.append(url)
        return servers

    def remember_replay_server(self, url):
        """``url`` (normalized) was replayed on: offered first next time (at most ``MAX_REPLAY_SERVERS`` kept)."""
        servers = [url] + [s for s in self._list("ReplayServers") if s != url]
        self.write("ReplayServers", servers[:MAX_REPLAY_SERVERS])

    def key_for(self, url):
        """The API key to offer for ``url``: the configured key for the configured server, else none (keys of other
        servers are not stored)."""
        return self.api_key if url == self.url else None

    # ------------------------------------------------------------------ consent
    def consented(self):
        """The server URLs the user allowed images to go to."""
        return self._list("ConsentedServers")

    def set_consent(self, url_text, allowed):
        """The consent box was (un)checked for the URL typed (nothing for one that cannot be a URL)."""
        try:
            url = normalize_url(url_text or DEFAULT_URL)
        except ValueError:
            return
        servers = [s for s in self.consented() if s != url]
        self.write("ConsentedServers", servers + ([url] if allowed else []))

    def consent_box(self, url_text):
        """``(checked, enabled, tooltip)`` of the consent check box for the URL typed."""
        try:
            url = normalize_url(url_text or DEFAULT_URL)
        except ValueError:
            return False, False, "Enter a valid server URL first."
        if is_local_url(url):
            return True, False, "The server is on this computer: nothing leaves it."
        return url in self.consented(), True, "Images and segments are sent to %s for processing." % url

    def may_send(self, url, ask=None):
        """Whether images may go to ``url``: on this computer, consented before, or ``ask(question)`` says yes now
        (kept). Without ``ask``, only what was decided before counts."""
        if is_local_url(url) or url in self.consented():
            return True
        if ask is None or not ask(CONSENT_QUESTION % url):
            return False
        self.set_consent(url, True)
        return True

    def refusal(self, url, ask=None):
        """None when images may go to ``url`` (see ``may_send``), else the status line saying why not."""
        if self.may_send(url, ask):
            return None
        return "Not sent: sending images to %s needs your consent (Configuration tab)." % url


def summary(url_text, info=None):
    """The line above the tabs: the server, and its model once Test connection told it."""
    model = (info or {}).get("model") or (info or {}).get("server") or ""
    return "Server: %s%s" % (url_text, " (%s)" % model if model else "")


def describe(info):
    """What Test connection shows for a server that answered (``client.check_server``'s dict)."""
    lines = ["Connected."]
    for key, label in (("server", "Server"), ("version", "Version"), ("model", "Model"), ("license", "License")):
        if info.get(key):
            lines.append("%s: %s" % (label, info[key]))
    if info.get("supported_interactions"):
        lines.append("Prompts: %s" % ", ".join(info["supported_interactions"]))
    if info.get("preferred_scribble_thickness") is not None:
        lines.append("Scribble thickness: %s voxels" % (info["preferred_scribble_thickness"],))
    lines.append("Undo on the server: %s" % ("yes" if info.get("supports_undo") else "no"))
    if info.get("models"):
        lines.append("Automatic models: %s" % ", ".join(m.get("name") or m["id"] for m in info["models"]))
    return "\n".join(lines)
