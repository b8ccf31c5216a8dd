"""Modal dialogs, recorded: what module code shows is recorded; questions get the test's queued answers.

``slicer.util.errorDisplay``, ``infoDisplay``, ``warningDisplay``, ``confirmOkCancelDisplay``,
``confirmYesNoDisplay`` and ``messageBox`` are Slicer's real functions (from the slicer-core wheel); they end in
``ctk.ctkMessageBox(...).exec_()``, which lands here. ``delayDisplay`` and module dialogs end in
``qt.QDialog.exec_()``, which lands here too. Each shown dialog becomes a ``Shown`` record in
``DIALOGS.shown``; then, as a modal dialog's ``exec()`` does (QDialog::exec runs a QEventLoop until the dialog is
closed), Qt's event loop runs for ``DIALOGS.dwell`` seconds while the user "reads" it: timers fire, and whatever
they show is a dialog stacked on the first (``Shown.depth`` 2 and up; ``DIALOGS.max_depth``). The loop holds the
GIL as Slicer's does (Testing/pythonqt_gil.run_qt). Then the dialog is closed with its answer.

Answers: ``DIALOGS.answers`` is a queue the test fills (``True``/``False`` for OK-Yes-Retry / Cancel-No-Close,
or a ``qt.QMessageBox`` standard button). A question with no queued answer is answered with the negative button
(Cancel / No / Close) and recorded with ``answered=False``; ``SlicerApp`` fails the test on it unless the test
set ``allow_unanswered``. A generic QDialog's ``exec_()`` returns ``DIALOGS.dialog_result(dialog)``
(QDialog.Rejected by default, as if the user closed it).

Not reproduced: the dialog is never painted or laid out for a user, and it is not the active modal widget
while its loop runs (the harness's guard for dialogs created by C++ would close it); "Don't show again" check boxes
(``dontShowAgainSettingsKey``) are recorded but never checked; non-modal ``show()``n dialogs are not recorded.
"""

import collections

from PySide6 import QtWidgets

MB = QtWidgets.QMessageBox
ICON_KIND = {MB.Critical: "error", MB.Warning: "warning", MB.Information: "info", MB.Question: "question",
             MB.NoIcon: "message"}
DWELL_SECONDS = 0.1  # how long a modal dialog stays open (its nested event loop runs meanwhile)
POSITIVE = (MB.Ok, MB.Yes, MB.Retry, MB.YesToAll, MB.Save, MB.Open, MB.Apply)
NEGATIVE = (MB.Cancel, MB.No, MB.Close, MB.Abort, MB.NoToAll, MB.Discard, MB.Ignore)


class Shown(object):
    def __init__(self, kind, text="", title="", detailedText="", answer=None, answered=True, widget_texts=(),
                 question=False, depth=1):
        self.kind = kind  # error, warning, info, question, message, dialog, file, input
        self.text = text
        self.title = title
        self.detailedText = detailedText
        self.answer = answer
        self.answered = answered
        self.question = question
        self.widget_texts = list(widget_texts)  # texts of labels and text boxes inside a generic dialog
        self.depth = depth  # 1: shown alone; 2 and up: shown while that many - 1 others were open

    def __repr__(self):
        return "Shown(%s, %r%s)" % (self.kind, self.text[:80], ", answer=%r" % (self.answer,) if self.question else "")


def _buttons(standard_buttons):
    value = int(getattr(standard_buttons, "value", standard_buttons) or 0)
    return [b for b in POSITIVE + NEGATIVE if value & int(b.value)]


class DialogRecorder(object):
    def __init__(self):
        self.reset()

    def reset(self):
        self.shown = []
        self.answers = collections.deque()
        self.file_answers = collections.deque()
        self.dialog_result = lambda dialog: QtWidgets.QDialog.Rejected
        self.dwell = DWELL_SECONDS
        self.open = 0  # dialogs open now

    @property
    def max_depth(self):
        """The most dialogs open at once so far (0: none shown)."""
        return max([s.depth for s in self.shown] or [0])

    def _modal(self, shown):
        """Record ``shown``, run the event loop while it is open (a modal dialog's nested loop), close it."""
        import pythonqt_gil

        self.open += 1
        shown.depth = self.open
        self.shown.append(shown)
        try:
            pythonqt_gil.run_qt(self.dwell)
        finally:
            self.open -= 1
        return shown

    # --- answers
    def _answer(self, buttons, kind):
        positives = [b for b in buttons if b in POSITIVE]
        negatives = [b for b in buttons if b in NEGATIVE]
        question = bool(positives and negatives)
        if not question:
            return (buttons[0] if buttons else MB.Ok), True, False
        if not self.answers:
            return negatives[0], False, True
        answer = self.answers.popleft()
        if isinstance(answer, bool):
            answer = positives[0] if answer else negatives[0]
        return answer, True, True

    # --- entry points
    def exec_dialog(self, dialog):
        if isinstance(dialog, QtWidgets.QMessageBox):
            icon = QtWidgets.QMessageBox.icon(dialog)
            buttons = _buttons(QtWidgets.QMessageBox.standardButtons(dialog))
            answer, answered, question = self._answer(buttons, "message")
            self._modal(Shown(
                "question" if question else ICON_KIND.get(icon, "message"),
                QtWidgets.QMessageBox.text(dialog), QtWidgets.QWidget.windowTitle(dialog).strip(),
                QtWidgets.QMessageBox.detailedText(dialog), answer, answered, question=question))
            QtWidgets.QDialog.done(dialog, 0)
            return int(answer.value)
        texts = []
        for child in dialog.findChildren(QtWidgets.QWidget):
            if isinstance(child, QtWidgets.QLabel):
                texts.append(QtWidgets.QLabel.text(child))
            elif isinstance(child, QtWidgets.QPlainTextEdit):
                texts.append(QtWidgets.QPlainTextEdit.toPlainText(child))
            elif isinstance(child, QtWidgets.QTextEdit):
                texts.append(QtWidgets.QTextEdit.toPlainText(child))
        result = self.dialog_result(dialog)
        self._modal(Shown("dialog", "\n".join(texts), QtWidgets.QWidget.windowTitle(dialog), answer=result,
                          widget_texts=texts))
        QtWidgets.QDialog.done(dialog, int(getattr(result, "value", result)))
        return result

    def static_message(self, kind, args, kwargs):
        # QMessageBox.question(parent, title, text, buttons=..., defaultButton=...)
        args = list(args)
        title = args[1] if len(args) > 1 else kwargs.get("title", "")
        text = args[2] if len(args) > 2 else kwargs.get("text", "")
        buttons = args[3] if len(args) > 3 else kwargs.get("buttons", MB.Yes | MB.No if kind == "question" else MB.Ok)
        answer, answered, question = self._answer(_buttons(buttons), kind)
        self._modal(Shown("question" if question else {"critical": "error", "information": "info",
                                                       "about": "info"}.get(kind, kind),
                          text, title, answer=answer, answered=answered, question=question))
        return answer

    def static_file(self, kind, args, kwargs):
        answer = self.file_answers.popleft() if self.file_answers else ""
        self._modal(Shown("file", kind, args[1] if len(args) > 1 else "", answer=answer, answered=bool(answer)))
        return answer

    def static_input(self, kind, args, kwargs):
        answer = self.answers.popleft() if self.answers else None
        self._modal(Shown("input", args[2] if len(args) > 2 else "", args[1] if len(args) > 1 else "",
                          answer=answer, answered=answer is not None, question=True))
        return answer

    def unanswered(self):
        return [s for s in self.shown if s.question and not s.answered]


DIALOGS = DialogRecorder()
