"""Whether prompts add to the segment (positive) or remove from it (negative): one truth, held here, that the
controller stamps on each prompt and the widget shows (its two buttons, the armed tool's colour, the status)."""


class Polarity(object):
    """``positive``: the current polarity. ``on_change(positive)`` is called after every ``set`` (also when it stays
    the same, so that what shows it is refreshed)."""

    def __init__(self, on_change=None):
        self.positive = True
        self.on_change = on_change

    def set(self, positive):
        self.positive = bool(positive)
        if self.on_change is not None:
            self.on_change(self.positive)

    def toggle(self):
        self.set(not self.positive)
        return self.positive
