"""nnInteractive server for SlicerNNInteractive, speaking nnInteractive 2.6's remote protocol."""

__version__ = "0.1.0"
