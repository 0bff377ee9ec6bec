"""Offline objectives: the pure loss maths (``losses``), your own loss terms (``terms``), the
loss a batch goes through (``loss``) and the reference log-probs kept on disk (``reference_cache``)."""
