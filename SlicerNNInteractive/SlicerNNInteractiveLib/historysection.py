"""The panel's Prompt history section: Continue (a reopened scene's segment goes on where its saved prompts stopped),
Replay on another model or server (the segment's prompts, with predictions, on a server the user picks: the result is
a new segment to compare), and Cancel for a replay.

Qt and Slicer wiring for the module's widget, imported by its ``setup()`` (as configtab.py is for the Configuration
tab): what the section says and which buttons apply is historyview.py's, the work the controller's. ``widget`` is the
module widget: its ``ui``, ``settings``, ``logic``, ``messages`` and its controller.
"""

import logging

import qt

import slicer

from .historyview import HistoryView, continued_text

REPLAY_INTRO = ("Replays the %d prompt(s) of %s since its last reset, one prediction each, on the server below (another "
                "model or checkpoint). The mask it ends with becomes a new segment; yours is not changed.")


class HistorySection(object):
    def __init__(self, widget):
        self.widget = widget
        self.ui = ui = widget.ui
        self.view = HistoryView()
        self.shown = None  # what the widgets show now
        ui.continueButton.connect("clicked()", self.onContinue)
        ui.replayButton.connect("clicked()", self.onReplay)
        ui.cancelReplayButton.connect("clicked()", self.onCancelReplay)
        self.refresh()

    def controller(self):
        """The widget's controller (made if needed) when a volume and a segmentation are there to look at; else
        None."""
        widget = self.widget
        if widget.sourceVolumeNode() is None or widget.editor.segmentationNode() is None:
            return None
        return widget.getController()

    def refresh(self):
        """Show what the selected segment's prompts allow (cheap unless its saved prompts must be read again). Not
        while the scene loads or closes (its nodes are half there): the widget refreshes after the batch."""
        ui, widget = self.ui, self.widget
        if slicer.mrmlScene.IsBatchProcessing():
            return
        state = self.view.state(self.controller())
        shown = (state.text, state.continuable, state.can_continue, state.can_replay, bool(state.replaying))
        if shown != self.shown:  # called on every tick while the controller works
            self.shown = shown
            ui.historyLabel.text = state.text
            ui.historyLabel.visible = bool(state.text)
            ui.continueButton.visible, ui.continueButton.enabled = state.continuable, state.can_continue
            ui.replayButton.enabled = state.can_replay
            ui.cancelReplayButton.enabled = bool(state.replaying)
        if state.report:
            logging.warning("nnInteractive: " + state.report)
            widget.setStatus(state.report)

    def forget(self):
        """The scene closes: saved prompts are read and reported afresh in the next one."""
        self.view.forget()

    def onContinue(self):
        from .history import HistoryError

        controller = self.controller()
        if controller is None:
            return
        try:
            summary = controller.continue_segment()
        except HistoryError as exc:
            self.widget.reportError(str(exc))
        else:
            key = controller.scene.selected_segment()
            self.widget.setStatus(continued_text(controller.scene.segment_name(key), summary))
        self.refresh()

    def onReplay(self):
        widget = self.widget
        controller = self.controller()
        if controller is None or not widget.volumeChosen():
            return
        key = controller.scene.selected_segment()
        history = controller.histories.get(key) if key is not None else None
        if history is None or not history.steps:
            self.refresh()
            return
        target = self.askTarget(REPLAY_INTRO % (len(history.steps), controller.scene.segment_name(key)))
        if target is None:
            return
        url, apiKey, label = target
        try:
            refusal = widget.permission(url)
        except Exception as exc:
            widget.reportError(str(exc))
            return
        if refusal is not None:
            widget.setStatus(refusal)
            return
        widget.settings.remember_replay_server(url)
        controller.replay_elsewhere(lambda: widget.logic.connect(url, apiKey), key, label or None,
                                    where=url.split("://", 1)[-1])
        widget.startTicking()
        self.refresh()

    def askTarget(self, intro):
        """The replay's server, key and segment label from a small dialog: ``(url, key or None, label)``, or None
        (cancelled, or a URL that cannot be one: the user is told why)."""
        from .urls import normalize_url

        settings = self.widget.settings
        dialog = qt.QDialog(slicer.util.mainWindow())
        dialog.setObjectName("ReplayDialog")
        dialog.setWindowTitle("Replay on another model or server")
        form = qt.QFormLayout(dialog)
        text = qt.QLabel(intro)
        text.wordWrap = True
        form.addRow(text)
        urls = qt.QComboBox()
        urls.setObjectName("replayUrlComboBox")
        urls.editable = True
        urls.toolTip = "A server replayed on before, the configured one, or any URL"
        for url in settings.replay_servers():
            urls.addItem(url)
        key = qt.QLineEdit()
        key.setObjectName("replayApiKeyLineEdit")
        key.echoMode = qt.QLineEdit.Password
        key.toolTip = "The API key of that server (the configured key is offered for the configured server)"
        label = qt.QLineEdit()
        label.setObjectName("replayLabelLineEdit")
        label.placeholderText = "the server's model name"
        label.toolTip = "Names the new segment '<segment> on <this>'"
        form.addRow("Server URL:", urls)
        form.addRow("API key:", key)
        form.addRow("Name:", label)
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
        buttons.connect("accepted()", dialog.accept)
        buttons.connect("rejected()", dialog.reject)
        form.addRow(buttons)

        def offerKey(text):
            try:
                key.text = settings.key_for(normalize_url(text)) or ""
            except ValueError:
                pass

        urls.connect("currentTextChanged(QString)", offerKey)
        offerKey(urls.currentText)
        accepted = dialog.exec_() == qt.QDialog.Accepted
        values = (urls.currentText, key.text.strip() or None, label.text.strip())
        dialog.deleteLater()
        if not accepted:
            return None
        try:
            return (normalize_url(values[0]),) + values[1:]
        except ValueError as exc:
            self.widget.reportError(str(exc))
            return None

    def onCancelReplay(self):
        if self.widget.controller is not None and self.widget.controller.cancel_replay():
            self.widget.setStatus("Replay cancelled: no segment was added.")
        self.refresh()
