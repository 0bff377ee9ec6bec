"""The demo's world: items to review, a review generator, and a word-list sentiment classifier.

A miniature of the DPO paper's controlled-sentiment experiment: a small model
pre-trained on an even mix of positive and negative reviews should, after DPO
on (positive, negative) pairs, write positive reviews for items it has never
seen. Everything here is deterministic given a seed.
"""

from __future__ import annotations

import random
import re

KINDS = [
    "film", "novel", "album", "restaurant", "hotel", "phone", "laptop", "museum", "cafe",
    "concert", "podcast", "bakery", "video game", "theme park", "bicycle", "camera",
    "headphones", "sofa", "play", "musical", "documentary", "comic", "board game", "spa",
    "gym", "bookshop", "pizzeria", "ferry", "guesthouse", "tablet", "watch", "backpack",
    "tent", "blender", "coffee machine", "art show", "zoo", "aquarium", "festival", "train",
]
NAMES = [
    "Aurora", "Blue Harbor", "Cedar", "Delta", "Ember", "Falcon", "Granite", "Harvest",
    "Iris", "Juniper", "Kestrel", "Lumen", "Meadow", "Nimbus", "Orchid", "Pioneer",
    "Quartz", "Riverside", "Summit", "Tundra", "Umber", "Velvet", "Willow", "Zephyr",
    "Golden Gate", "Silver Lake", "Old Mill", "North Star", "Red Fox", "Little Oak",
]

POSITIVE = [
    "wonderful", "excellent", "delightful", "brilliant", "superb", "charming", "lovely",
    "fantastic", "great", "amazing", "outstanding", "pleasant", "memorable", "impressive",
    "beautiful", "enjoyable", "perfect", "friendly", "fresh", "marvelous", "splendid",
    "terrific", "stunning", "cozy", "elegant", "reliable", "generous", "uplifting",
]
NEGATIVE = [
    "terrible", "awful", "boring", "dreadful", "poor", "dull", "disappointing", "horrible",
    "bad", "mediocre", "unpleasant", "forgettable", "clumsy", "ugly", "tedious", "broken",
    "rude", "stale", "noisy", "cheap", "annoying", "frustrating", "bland", "gloomy",
    "sloppy", "unreliable", "overpriced", "miserable",
]
ASPECTS = {
    "film": ["acting", "story", "soundtrack", "ending"], "novel": ["plot", "characters", "prose", "ending"],
    "album": ["songs", "vocals", "production", "lyrics"], "restaurant": ["food", "service", "menu", "prices"],
    "hotel": ["rooms", "staff", "breakfast", "location"], "phone": ["battery", "screen", "camera", "design"],
    "laptop": ["keyboard", "screen", "battery", "speed"], "museum": ["exhibits", "staff", "building", "guide"],
    "cafe": ["coffee", "cakes", "staff", "music"],
}
DEFAULT_ASPECTS = ["quality", "price", "design", "experience", "details", "staff"]
OPENERS = [
    "I visited", "I tried", "We went to", "I finally checked out", "My family tried", "Last week I tried",
    "I spent a day with", "A friend recommended", "I bought", "We booked",
]
VERDICTS_POS = ["I would recommend it to anyone.", "I will come back for sure.", "Worth every penny.", "Five stars from me.", "I loved it."]
VERDICTS_NEG = ["I would not recommend it.", "I will not come back.", "Not worth the money.", "One star from me.", "I regret it."]


def all_items() -> list[str]:
    return [f"the {name} {kind}" for kind in KINDS for name in NAMES]


def split_items(seed: int = 0, held_out: float = 0.15) -> tuple[list[str], list[str]]:
    """(training items, held-out items): held-out items appear in no training text."""
    items = all_items()
    random.Random(seed).shuffle(items)
    n = int(len(items) * held_out)
    return items[n:], items[:n]


def prompt_for(item: str) -> str:
    return f"Write a review of {item}."


def review(item: str, positive: bool, rng: random.Random) -> str:
    """One to three sentences about ``item`` using only one side's sentiment words."""
    words = POSITIVE if positive else NEGATIVE
    kind = item.split()[-1] if item.split()[-1] in ASPECTS else None
    aspects = ASPECTS.get(kind or "", DEFAULT_ASPECTS)
    a1, a2 = rng.sample(aspects, 2)
    w1, w2, w3 = rng.sample(words, 3)
    sentences = [
        rng.choice([
            f"{rng.choice(OPENERS)} {item} and it was {w1}.",
            f"{item[0].upper() + item[1:]} is {w1}.",
            f"What a {w1} {item.split(' ', 1)[1].split()[-1]}.",
        ]),
        rng.choice([
            f"The {a1} was {w2} and the {a2} was {w3}.",
            f"The {a1} felt {w2}, and the {a2} too.",
            f"Honestly the {a1} was {w2}.",
        ]),
    ]
    if rng.random() < 0.6:
        sentences.append(rng.choice(VERDICTS_POS if positive else VERDICTS_NEG))
    return " ".join(sentences[: rng.choice([2, 3, 3])])


_WORD = re.compile(r"[a-z]+")
_POS, _NEG = set(POSITIVE) | {"loved", "recommend"}, set(NEGATIVE) | {"regret"}


def sentiment_score(text: str) -> int:
    """(# positive words) - (# negative words); a negation flips the next word's sign."""
    score, flip = 0, False
    for w in _WORD.findall(text.lower()):
        if w in ("not", "never", "no"):
            flip = True
            continue
        s = (w in _POS) - (w in _NEG)
        score += -s if flip else s
        flip = False
    return score


def is_positive(text: str) -> bool:
    """The demo's classifier: positive iff the word-list score is above zero."""
    return sentiment_score(text) > 0
