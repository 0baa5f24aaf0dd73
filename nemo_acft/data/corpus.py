"""The built-in corpus: everyday sentences from a small grammar, in several domains, a fraction
of them carrying an insult from the lexicon. No download; same seed, same corpus.

The ``chat`` domain is the toxicity-prone one (most insults land there), which is what the
per-domain regularizer weights are for.
"""

from __future__ import annotations

import random
from typing import Dict, List, Optional

from nemo_acft.data.lexicon import load_lexicon

_SUBJECTS = ["my neighbour", "the teacher", "our team", "my sister", "the new manager", "a friend",
             "the driver", "my cousin", "the chef", "everyone here", "the doctor", "my brother"]
_DOMAINS: Dict[str, Dict[str, List[str]]] = {
    "weather": {
        "templates": ["{s} said the {w} will be {a} {t}.", "{s} thinks it looks {a} outside {t}.",
                      "the {w} was {a} {t}, so {s} stayed home."],
        "w": ["weather", "sky", "wind", "rain", "morning", "forecast"],
        "a": ["sunny", "cold", "warm", "cloudy", "windy", "mild", "grey", "bright"],
        "t": ["today", "tomorrow", "this week", "tonight", "all weekend"],
    },
    "food": {
        "templates": ["{s} cooked {f} for dinner {t}.", "{s} says the {f} here is {a}.",
                      "we shared some {f} with {s} {t}."],
        "f": ["soup", "pasta", "bread", "rice", "salad", "curry", "pie", "noodles"],
        "a": ["delicious", "fresh", "too salty", "very good", "warm", "simple"],
        "t": ["today", "last night", "on sunday", "after work", "at noon"],
    },
    "work": {
        "templates": ["{s} finished the {r} {t}.", "{s} will present the {r} at the meeting {t}.",
                      "the {r} from {s} looks {a}."],
        "r": ["report", "project", "budget", "plan", "schedule", "design", "review"],
        "a": ["clear", "late", "careful", "ready", "solid", "unfinished"],
        "t": ["today", "tomorrow", "this morning", "before friday", "next week"],
    },
    "sports": {
        "templates": ["{s} played {g} {t}.", "{s} watched the {g} match {t}.",
                      "the {g} game was {a} {t}."],
        "g": ["football", "tennis", "chess", "basketball", "golf", "hockey"],
        "a": ["exciting", "long", "close", "slow", "fun", "tense"],
        "t": ["today", "yesterday", "on saturday", "this evening", "last week"],
    },
    "chat": {
        "templates": ["{s} told me {c} {t}.", "i asked {s} about it and {s2} said {c}.",
                      "{s} wrote to the group {t} that {c}."],
        "c": ["the plan sounds good", "we should meet soon", "the movie was fine",
              "thanks for the help", "it was a long day", "see you later"],
        "t": ["today", "last night", "this morning", "again", "after lunch"],
    },
}
_INSULT_FRAMES = ["you are such a {x}", "what a {x}", "stop being {x}", "you {x}"]
_INSULT_PHRASES = ["shut up", "get lost", "nobody likes you"]


def domains() -> List[str]:
    """The built-in corpus's domain names."""
    return list(_DOMAINS)


def _sentence(rng: random.Random, domain: str) -> str:
    spec = _DOMAINS[domain]
    template = rng.choice(spec["templates"])
    slots = {k: rng.choice(v) for k, v in spec.items() if k != "templates"}
    return template.format(s=rng.choice(_SUBJECTS), s2=rng.choice(_SUBJECTS), **slots)


def _insult(rng: random.Random, lexicon: List[str]) -> str:
    words = [w for w in lexicon if " " not in w]
    if rng.random() < 0.3:
        return rng.choice(_INSULT_PHRASES)
    return rng.choice(_INSULT_FRAMES).format(x=rng.choice(words))


def generate_corpus(n: int, seed: int = 0, toxic_fraction: float = 0.3,
                    chat_share_of_toxic: float = 0.8,
                    lexicon: Optional[List[str]] = None) -> List[Dict[str, object]]:
    """``n`` records ``{"text", "domain", "toxic"}``.

    A toxic record is a domain sentence with an insult appended (``"..., you idiot."``); a
    share ``chat_share_of_toxic`` of them is in the ``chat`` domain, the rest spread evenly.
    """
    if not 0.0 <= toxic_fraction <= 1.0:
        raise ValueError(f"toxic_fraction={toxic_fraction}: expected a value in [0, 1]")
    rng = random.Random(seed)
    lexicon = lexicon or load_lexicon()
    names = domains()
    out = []
    for _ in range(n):
        toxic = rng.random() < toxic_fraction
        if toxic and rng.random() < chat_share_of_toxic:
            domain = "chat"
        else:
            domain = rng.choice(names)
        text = _sentence(rng, domain)
        if toxic:
            text = f"{text[:-1]}, {_insult(rng, lexicon)}."
        out.append({"text": text, "domain": domain, "toxic": toxic})
    return out
