"""The training loop (``trainer``), training in rounds (``rounds``), checkpoints
(``checkpoint``) and the metrics file (``metrics_log``)."""
