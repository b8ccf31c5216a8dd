"""What happens to a prompt the user placed, and what the user is told: the module's dispatch and failure policy.

Qt-free: the widget hands in functions (show a dialog, set the status line, check the server may be used, create
the controller) and calls ``PromptDispatch.send`` for every prompt.

* A prompt is sent only when the server may be used (the codec installed, consent given for a remote server);
  otherwise nothing is sent and the user is told why, once.
* One failure, one message: ``Messages`` shows one error dialog at a time. A modal dialog runs an event loop (the
  module's timer keeps firing inside it), so a second failure while it is open (the prompt queued behind a failed
  connection, say) goes to the status line and the log only, never as a dialog stacked on the first.
* A prompt that is never applied (refused here, failed on the server, dropped behind a failure, cancelled by a
  reset or a new server) gets its ``unsent()`` called, so that the widget removes its marker: a control point on
  screen means a prompt that was sent.
"""

from .errors import NNInteractiveError


class Messages(object):
    """Errors and status for the user. ``dialog(message, details)`` shows a modal error dialog (None: collect the
    errors in ``collected`` instead, as the self-test does); ``status(text)`` sets the one-line status; ``log(text)``
    writes the log."""

    def __init__(self, dialog=None, status=None, log=None):
        self.dialog = dialog
        self.status = status or (lambda text: None)
        self.log = log or (lambda text: None)
        self.last = ""
        self.collected = []
        self.suppressed = 0  # errors that came while a dialog was open (status line and log only)
        self._open = False

    def info(self, text):
        """A status line (None: leave it as it is)."""
        if text is not None:
            self.last = text
            self.status(text)

    def error(self, message, details=None):
        self.last = message
        self.log("nnInteractive: %s%s" % (message, ("\n" + details) if details else ""))
        self.status(message.split("\n")[0])
        if self.dialog is None:
            self.collected.append(message)
            return
        if self._open:
            self.suppressed += 1
            return
        self._open = True
        try:
            self.dialog(message, details)
        finally:
            self._open = False


def failure_message(exc, dropped=0, job=None):
    """What the user reads when an action (``job``, when known) failed on the server."""
    message = str(exc) if isinstance(exc, (NNInteractiveError, ValueError)) else \
        "Unexpected error (%s: %s)." % (exc.__class__.__name__, exc)
    if job is not None and job.kind == "replay":
        from .presenter import replay_target

        return "The replay on %s failed: %s\nNo segment was changed." % (replay_target(job), message)
    if dropped:
        message += "\n%d queued prompt(s) were not sent." % dropped
    return message + "\nThe segment was not changed."


class PromptDispatch(object):
    """Sends prompts through the controller. ``permission()`` returns None when the server may be used, else the
    sentence saying why not (shown as status); it may raise (a dependency that could not be installed: shown as an
    error). ``controller()`` returns the controller (created on first use); ``prepare()`` runs before a prompt is
    queued (the widget makes sure a segmentation exists)."""

    def __init__(self, controller, permission, messages, prepare=None):
        self.controller = controller
        self.permission = permission
        self.messages = messages
        self.prepare = prepare or (lambda: None)
        self.paused = None  # why prompts are not sent now (the timing experiment runs), or None

    def allowed(self):
        """Whether the server may be used now; tells the user why not."""
        if self.paused is not None:
            self.messages.info(self.paused)
            return False
        try:
            refusal = self.permission()
        except Exception as exc:
            self.messages.error(str(exc))
            return False
        if refusal is not None:
            self.messages.info(refusal)
            return False
        return True

    def send(self, kind, args, prepare_ms=0.0, positive=None, unsent=None):
        """Queue a prompt (``args`` None: nothing to send). Returns its Job, or None (then ``unsent()`` has been
        called)."""
        if args is None:
            return None
        if not self.allowed():
            if unsent is not None:
                unsent()
            return None
        self.prepare()
        controller = self.controller()
        if not controller.sync.connected and not controller.busy:
            controller.connect()  # reports the server's capabilities (scribble thickness) before the prompt runs
        return controller.submit(kind, args, positive=positive, prepare_ms=prepare_ms, unsent=unsent)
