"""The module panel's Configuration tab: server URL, API key and CA bundle, the consent box, Test connection, the
local server and the timing experiment.

Qt and Slicer wiring for the module's widget, imported by its ``setup()`` (as boxtool.py and scribbletool.py are for
their tools): what is decided (settings and consent, what is shown) is settings.py's and presenter.py's, the work
the module logic's (starting a local server, the experiment). ``widget`` is the module widget: its ``ui``,
``settings``, ``logic``, ``dispatch``, ``messages`` and its controller.
"""

import traceback

import qt

import slicer

from .background import BackgroundCall
from .settings import describe, summary

TIMING_QUESTION = ("The timing experiment adds synthetic volumes of 3 sizes, runs every prompt type %d times on each "
                   "and removes them again. It can take minutes. Continue?")


class ConfigurationTab(object):
    def __init__(self, widget):
        self.widget = widget
        self.ui = ui = widget.ui
        self.localServer = None
        self.localServerTimer = None
        self.connectionCheck = None
        self.timingStop = False  # set when the scene closes: a timing experiment in progress stops
        self.connectionTimer = qt.QTimer()
        self.connectionTimer.setInterval(20)
        self.connectionTimer.connect("timeout()", self.onTestConnectionPoll)
        settings = widget.settings
        ui.serverUrlLineEdit.text = settings.url
        ui.apiKeyLineEdit.text = settings.api_key or ""
        ui.caBundlePathLineEdit.currentPath = settings.ca_bundle or ""
        ui.executablePathLineEdit.currentPath = settings.read("LocalServerExecutable", "")
        ui.extraArgumentsLineEdit.text = settings.read("LocalServerArguments", "")
        ui.serverUrlLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        ui.apiKeyLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        ui.caBundlePathLineEdit.connect("currentPathChanged(QString)", lambda path: self.onServerSettingsChanged())
        ui.showApiKeyCheckBox.connect("toggled(bool)", self.onShowApiKey)
        ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        ui.consentCheckBox.connect("toggled(bool)", lambda checked: settings.set_consent(ui.serverUrlLineEdit.text,
                                                                                          checked))
        ui.startLocalServerButton.connect("clicked()", self.onStartLocalServer)
        ui.stopLocalServerButton.connect("clicked()", self.onStopLocalServer)
        ui.runTimingButton.connect("clicked()", self.onRunTiming)
        self.updateConsentCheckBox()
        ui.serverSummaryLabel.text = summary(settings.url)

    def stop(self):
        """The module is unloaded or the application quits."""
        self.connectionTimer.stop()
        self.onStopLocalServer()

    # ------------------------------------------------------------------ server and consent
    def onServerSettingsChanged(self):
        ui = self.ui
        try:
            url, changed = self.widget.settings.update(ui.serverUrlLineEdit.text, ui.apiKeyLineEdit.text,
                                                       ui.caBundlePathLineEdit.currentPath)
        except ValueError as exc:
            ui.connectionInfoLabel.text = str(exc)
            return
        ui.serverUrlLineEdit.text = url
        if changed:  # another server: its session, and the old one's models, are no longer ours
            self.widget.onServerChanged()
            ui.connectionInfoLabel.text = ""
        self.updateConsentCheckBox()
        ui.serverSummaryLabel.text = summary(url)

    def onShowApiKey(self, show):
        self.ui.apiKeyLineEdit.echoMode = qt.QLineEdit.Normal if show else qt.QLineEdit.Password

    def updateConsentCheckBox(self):
        box = self.ui.consentCheckBox
        box.blockSignals(True)
        box.checked, box.enabled, box.toolTip = self.widget.settings.consent_box(self.ui.serverUrlLineEdit.text)
        box.blockSignals(False)

    def onTestConnection(self):
        self.onServerSettingsChanged()
        try:
            self.widget.logic.ensureDependencies(ask=True)
        except Exception as exc:
            self.ui.connectionInfoLabel.text = "Failed: %s" % exc
            return
        from .client import check_server

        settings = self.widget.settings
        url, apiKey, bundle = settings.url, settings.api_key, settings.ca_bundle
        self.ui.connectionInfoLabel.text = "Connecting to %s..." % url
        self.ui.testConnectionButton.enabled = False
        self.connectionCheck = BackgroundCall(lambda: check_server(url, api_key=apiKey, ca_bundle=bundle))
        self.connectionTimer.start()

    def onTestConnectionPoll(self):
        call = self.connectionCheck
        if call is None or not call.poll():
            return
        self.connectionTimer.stop()
        self.connectionCheck = None
        self.ui.testConnectionButton.enabled = True
        if call.error is not None:
            self.ui.connectionInfoLabel.text = "Failed: %s" % call.error
            return
        info = call.result
        self.ui.connectionInfoLabel.text = describe(info)
        self.widget.onServerDescribed(info)
        self.ui.serverSummaryLabel.text = summary(self.widget.settings.url, info)

    # ------------------------------------------------------------------ local server
    def onStartLocalServer(self):
        settings, ui = self.widget.settings, self.ui
        executable, arguments = ui.executablePathLineEdit.currentPath.strip(), ui.extraArgumentsLineEdit.text
        settings.write("LocalServerExecutable", executable)
        settings.write("LocalServerArguments", arguments)
        self.onStopLocalServer()
        try:
            server = self.widget.logic.startLocalServer(executable, arguments)
        except Exception as exc:
            ui.localServerStatusLabel.text = "Could not start: %s" % exc
            return
        ui.serverUrlLineEdit.text = server.url
        ui.apiKeyLineEdit.text = server.api_key
        self.onServerSettingsChanged()
        self.adoptLocalServer(server)

    def adoptLocalServer(self, server):
        """Follow ``server`` (a LocalServer; None: none) until it is ready."""
        self.localServer = server
        if server is None:
            return
        self.localServerTimer = qt.QTimer()
        self.localServerTimer.setInterval(500)
        self.localServerTimer.connect("timeout()", self.onLocalServerPoll)
        self.localServerTimer.start()
        self.onLocalServerPoll()

    def onLocalServerPoll(self):
        if self.localServer is None:
            return
        state, message = self.localServer.status()
        self.ui.localServerStatusLabel.text = message
        if state != "starting" and self.localServerTimer is not None:
            self.localServerTimer.stop()
            {"failed": lambda: self.widget.reportError("The local server could not start.", message),
             "ready": self.onTestConnection}.get(state, lambda: None)()

    def onStopLocalServer(self):
        if self.localServerTimer is not None:
            self.localServerTimer.stop()
            self.localServerTimer = None
        server, self.localServer = self.localServer, None
        if server is not None:
            if server.url == self.widget.settings.url:
                self.widget.disconnect()
            server.stop()
            self.ui.localServerStatusLabel.text = "Not running."

    # ------------------------------------------------------------------ timing experiment
    def onRunTiming(self):
        """The paper's timing experiment on volumes it builds itself (no source volume needed). The module's own
        session is released first, so that a server with --max-sessions 1 can run it. It pumps events for minutes:
        meanwhile no second experiment and no prompts, and a scene close stops it."""
        widget, ui = self.widget, self.ui
        if not widget.dispatch.allowed() or not slicer.util.confirmOkCancelDisplay(
                TIMING_QUESTION % ui.repetitionsSpinBox.value):
            return
        widget.disarmTool()
        widget.disconnect()
        widget.dispatch.paused = "Not sent: the timing experiment is running (Configuration tab)."
        ui.runTimingButton.enabled = self.timingStop = False
        try:
            text = widget.logic.runTimingExperiment(widget.settings.url, widget.settings.api_key,
                                                    reps=ui.repetitionsSpinBox.value, sizes=widget.logic.timingSizes,
                                                    stop=lambda: self.timingStop)
            slicer.util.infoDisplay("Timing experiment (milliseconds, mean +- std):", windowTitle="nnInteractive",
                                    detailedText=text)
        except Exception as exc:
            widget.reportError("The timing experiment failed: %s" % exc, traceback.format_exc())
        finally:
            widget.dispatch.paused = None
            ui.runTimingButton.enabled = True
