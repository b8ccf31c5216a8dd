"""The panel's Prompt history section, decided without Qt: what it says about the selected segment's prompts, and
which of its buttons apply (history.py keeps the prompts; the controller continues and replays them; the widget's
historysection.py only copies this into its widgets).

* A segment whose prompts this session records: how many since its last reset; "Replay on another model or
  server" applies.
* A segment of a reopened scene whose saved prompts can be continued (``Controller.stored_history``): what was
  saved (prompts by kind, the servers that answered); "Continue" is offered (and can be pressed while nothing runs).
* Saved prompts that cannot be used (corrupt, of another format version, another image or segment, the segment
  changed since): the reason, shown in the section and reported once (status line and log), never applied; the
  next prompt starts afresh from the segment.

Checking saved prompts reads the segment and digests it: it is done again only when the segment, the image or the
saved text changed.
"""

KIND_WORDS = {"point": ("point", "points"), "bbox": ("box", "boxes"), "scribble": ("scribble", "scribbles"),
              "lasso": ("lasso", "lassos")}


def count_text(n, kind="prompt"):
    one, many = KIND_WORDS.get(kind, (kind, kind + "s"))
    return "%d %s" % (n, one if n == 1 else many)


def kinds_text(kinds):
    """"2 points, 1 box" from a history summary's ``kinds``."""
    return ", ".join(count_text(kinds[k], k) for k in ("point", "bbox", "scribble", "lasso") if kinds.get(k))


def servers_text(servers):
    """Who answered, from a history summary's ``servers``: "blobs at gpu-node:1527", each once."""
    names = []
    for server in servers or []:
        url = (server.get("url") or "").split("://", 1)[-1]
        name = " at ".join(part for part in (server.get("model"), url) if part)
        if name and name not in names:
            names.append(name)
    return ", ".join(names)


def continued_text(name, summary):
    """The status line after Continue."""
    return "Continuing %s from its %s (%s): the next prompt rebuilds them on the server first." % (
        name, count_text(summary["prompts"], "saved prompt"), kinds_text(summary["kinds"]) or "none")


class HistoryState(object):
    """What the section shows: ``text`` (empty: nothing to say), ``continuable`` (Continue is offered),
    ``can_continue`` (and can be pressed now: nothing runs), ``can_replay``, ``replaying`` (replays queued or running:
    Cancel applies), ``report`` (a sentence to report once, or None)."""

    __slots__ = ("text", "continuable", "can_continue", "can_replay", "replaying", "report")

    def __init__(self, text="", continuable=False, can_continue=False, can_replay=False, replaying=0, report=None):
        self.text, self.continuable, self.can_continue = text, continuable, can_continue
        self.can_replay, self.replaying, self.report = can_replay, replaying, report

    def __repr__(self):
        return "HistoryState(%r, continue=%s/%s, replay=%s, replaying=%d)" % (
            self.text, self.continuable, self.can_continue, self.can_replay, self.replaying)


class HistoryView(object):
    def __init__(self):
        self._checked = None  # (what was checked, (summary, why)) of the last saved history read
        self._reported = set()  # (segment, reason) already reported

    def forget(self):
        """Another scene: saved histories are read, and reported, afresh."""
        self._checked = None
        self._reported = set()

    def state(self, controller):
        """The ``HistoryState`` of the segment selected in ``controller.scene`` (``controller`` None: no volume or
        segmentation yet, nothing to show)."""
        if controller is None:
            return HistoryState()
        scene, replaying = controller.scene, controller.replay_pending()
        key = scene.selected_segment()
        if key is None:
            return HistoryState(replaying=replaying)
        name = scene.segment_name(key)
        history = controller.histories.get(key)
        if history is not None:
            n = len(history.steps)
            if not n:
                return HistoryState("%s: no prompts since its last reset." % name, replaying=replaying)
            return HistoryState("%s: %s since its last reset (%s), saved with the scene." % (
                name, count_text(n), kinds_text(history.summary()["kinds"])), can_replay=not replaying,
                replaying=replaying)
        text = scene.stored_history(key) if scene.keeps_histories else None
        if text is None:
            return HistoryState(replaying=replaying)
        checked = (key, scene.segment_version(key), scene.image_key(), scene.image_version(), text)
        if self._checked is None or self._checked[0] != checked:
            self._checked = (checked, controller.stored_history(key))
        summary, why = self._checked[1]
        if summary is not None:
            who = servers_text(summary["servers"])
            return HistoryState(
                "%s has %s saved with the scene (%s%s). Continue rebuilds them on the server, so that the next prompt "
                "goes on where they stopped; a prompt without Continue starts afresh from the segment." % (
                    name, count_text(summary["prompts"]), kinds_text(summary["kinds"]) or "none",
                    "; answered by " + who if who else ""),
                continuable=True, can_continue=not controller.busy, replaying=replaying)
        sentence = "The saved prompts of %s are not used: %s. The next prompt starts afresh from the segment." % (
            name, why.rstrip("."))
        report = None
        if (key, why) not in self._reported:
            self._reported.add((key, why))
            report = sentence
        return HistoryState(sentence, replaying=replaying, report=report)
