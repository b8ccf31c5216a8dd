"""The Prompts tab's Automatic segmentation section: the server's automatic models, Run and Cancel.

Qt wiring for the module's widget, imported by its ``setup()`` (as configtab.py is for the Configuration tab): what
the section shows is presenter.AutoPresenter's, the work the controller's. ``widget`` is the module widget: its
``ui``, its controller and its helpers (``volumeChosen``, ``mayConnect``, ``setStatus``, ``startTicking``).
"""

from .presenter import AutoPresenter


class AutoSection(object):
    def __init__(self, widget):
        self.widget = widget
        self.ui = ui = widget.ui
        self.presenter = AutoPresenter()
        ui.runAutoButton.connect("clicked()", self.onRunAuto)
        ui.cancelAutoButton.connect("clicked()", self.onCancelAuto)
        ui.autoModelComboBox.connect("currentIndexChanged(int)", self.onAutoModelChanged)
        self.listModels(None)

    def listModels(self, models):
        """List the server's automatic models (None: a server without them, or not asked yet)."""
        self.presenter.listed(models)
        combo = self.ui.autoModelComboBox
        combo.blockSignals(True)
        combo.clear()
        for label, modelId in self.presenter.items():
            combo.addItem(label, modelId)
        combo.blockSignals(False)
        self.onAutoModelChanged(combo.currentIndex)

    def onAutoModelChanged(self, index):
        self.ui.autoInfoLabel.text = self.presenter.info(index)
        self.updateButtons()

    def updateButtons(self):
        controller = self.widget.controller
        running = controller.auto_pending() if controller is not None else 0
        run, cancel = self.presenter.buttons(self.ui.autoModelComboBox.currentIndex, running)
        self.ui.runAutoButton.enabled, self.ui.cancelAutoButton.enabled = run, cancel

    def onRunAuto(self):
        """Run the chosen model on the source volume through the session (no second upload)."""
        widget = self.widget
        model = self.presenter.model(self.ui.autoModelComboBox.currentIndex)
        if model is None or not widget.volumeChosen() or not widget.mayConnect():
            return
        widget.ensureSegmentationNode()
        widget.getController().auto_segment(model["id"], label=model.get("name") or model["id"])
        widget.setStatus(self.presenter.started(model))
        self.updateButtons()
        widget.startTicking()

    def onCancelAuto(self):
        controller = self.widget.controller
        if controller is not None and controller.cancel_auto():
            self.widget.setStatus("Automatic segmentation cancelled.")
        self.updateButtons()
