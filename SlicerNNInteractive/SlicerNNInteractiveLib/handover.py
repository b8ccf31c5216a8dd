"""What outlives a developer-mode Reload of the module: the widget's ``onReload`` re-imports the module and its
library except this module, so what the old widget puts here the new one finds (a local server the user started
keeps running). Nothing else uses it."""

_KEPT = {}


def keep(name, obj):
    _KEPT[name] = obj


def take(name):
    """What was kept under ``name`` (once), or None."""
    return _KEPT.pop(name, None)
