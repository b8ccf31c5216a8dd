"""What the module's panel shows, decided without Qt: the automatic-segmentation section and the status line's
sentences. The widget copies these into its widgets."""

PROMPT_KINDS = ("point", "bbox", "scribble", "lasso")


class AutoPresenter(object):
    """The Automatic segmentation section. ``models``: the server's automatic models (dicts from /model_info) in the
    order the combo box lists them; None until a server was asked (and after the server settings changed: the old
    server's models must never be run on a new one)."""

    def __init__(self):
        self.models = None

    def listed(self, models):
        self.models = None if models is None else list(models)

    def forget(self):
        self.listed(None)

    def items(self):
        """(label, model id) for the combo box."""
        return [(m.get("name") or m["id"], m["id"]) for m in self.models or []]

    def model(self, index):
        return self.models[index] if self.models and 0 <= index < len(self.models) else None

    def info(self, index):
        """The line under the combo box."""
        if self.models is None:
            return "Test connection (Configuration tab) lists the server's automatic models."
        model = self.model(index)
        if model is None:
            return "This server runs no automatic models."
        labels = ", ".join(label.get("name", "") for label in model.get("labels") or [])
        text = "Segments: %s." % labels if labels else ""
        if model.get("license"):
            text += " License: %s" % model["license"]
        return text.strip()

    def buttons(self, index, running):
        """``(run enabled, cancel enabled)`` with ``running`` automatic runs queued, running or being written: one at a
        time (a second would add every segment twice)."""
        return self.model(index) is not None and not running, bool(running)

    @staticmethod
    def started(model):
        return "Automatic segmentation with %s..." % (model.get("name") or model["id"])


def tool_text(tool, positive):
    """The status line when a tool is armed or the polarity changes."""
    word = "positive" if positive else "negative"
    if tool is None:
        return "Prompts are %s now." % word
    return "%s tool armed (%s prompts)." % (tool.capitalize(), word)


def disarmed_text(tool, reason):
    """The status line when a tool was disarmed (None: by the user, nothing to say)."""
    return "%s tool disarmed: %s." % (tool.capitalize(), reason) if reason else None


def busy_text(job, pending):
    """The status line while the controller works: what runs now (None: leave the status as it is)."""
    if job is None:
        return None
    if job.kind == "auto":
        return "Automatic segmentation with %s..." % job.label
    if job.kind in PROMPT_KINDS + ("predict",):
        return "Segmenting..." if pending <= 1 else "Segmenting... (%d prompts queued)" % (pending - 1)
    if job.kind == "replay":
        done, total = job.progress or (0, 0)
        return "Replaying the prompts on %s: %d of %d..." % (replay_target(job), done, total)
    return None


def replay_target(job):
    """A replay job's server (or model) as the user named it."""
    return job.label or job.args.get("where") or "the other server"


def result_text(job, timings):
    """The status line when a job finished."""
    if job.kind in PROMPT_KINDS and not job.run:
        return "%s %s added: Run (N) predicts with every prompt added." % (
            "Positive" if job.positive else "Negative", job.kind)
    if job.kind == "predict":
        return "Run: %.0f ms (server %.0f ms)" % (timings.get("total_ms", 0),
                                                  timings.get("server_total_ms", timings.get("exchange_ms", 0)))
    if job.kind in PROMPT_KINDS:
        return "%s %s: %.0f ms (server %.0f ms)" % (
            "Positive" if job.positive else "Negative", job.kind, timings.get("total_ms", 0),
            timings.get("server_total_ms", timings.get("exchange_ms", 0)))
    if job.kind == "undo":
        return "Undone."
    if job.kind == "replay":
        return "Replayed %d prompt(s) on %s in %.1f s: compare your segment with the new one, %s." % (
            timings.get("replayed", 0), replay_target(job), timings.get("total_ms", 0) / 1e3,
            timings.get("segment_name", "?"))
    if job.kind == "auto":
        return "%s: %d segment(s) in %.1f s (server %.1f s). Select one and prompt to refine it." % (
            job.label, len(timings.get("segments", ())), timings.get("total_ms", 0) / 1e3,
            timings.get("server_total_ms", 0) / 1e3)
    return None


def queue_text(position):
    """The busy bar's text while our server says the job waits for the GPU, else None."""
    if not (position and position.get("waiting")):
        return None
    text = "Waiting for the GPU: %d ahead" % position.get("ahead", 0)
    if position.get("expected_wait_seconds") is not None:
        text += " (~%.0f s)" % position["expected_wait_seconds"]
    return text
