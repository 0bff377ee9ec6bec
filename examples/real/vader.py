"""The reward of the sentiment frontier (``frontier.yaml``): VADER's compound score of a completion.

VADER (Hutto & Gilbert 2014) is a rule-based sentiment scorer from PyPI
(``pip install --no-deps vadersentiment==3.3.2``); its compound score runs from -1 (most
negative) to +1 (most positive), 0 for neutral text. It stands in for the DPO paper's
IMDb sentiment classifier. Imported at the top, so a missing package stops a sweep when
the reward functions load, not at the first evaluation.
"""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_ANALYZER = SentimentIntensityAnalyzer()


def compound(completions: list, **kwargs) -> list[float]:
    """VADER's compound score (-1..1) of each completion's text."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(_ANALYZER.polarity_scores(t)["compound"]) for t in texts]
