"""The routes, by concern: ``protocol`` (nnInteractive 2.6's remote protocol), ``extensions`` (ours, under /x/),
``operations`` (what an operator or an orchestrator asks: health, metrics)."""
