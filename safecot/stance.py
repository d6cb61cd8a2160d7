"""Whether two near-identical thoughts agree: the words that carry a thought's stance (negation,
permitted / forbidden, modals, quantifiers, numbers). Stage 2's near-duplicate pass keeps a pair
that disagrees for the refiner however close their embeddings are (02_refine.py: drop_duplicates).
"""
from __future__ import annotations

import re

# Words that carry a thought's stance, by class. Two near-identical thoughts whose counts of a class
# differ disagree ("allowed" / "not allowed" / "forbidden", "must" / "may", "5 mg" / "50 mg") however
# close their embeddings; synonyms share a class, so a restatement ("forbids" / "prohibits") agrees.
STANCE = {w: cls for cls, words in {
    "not": "not no never none nothing nobody neither nor without non",
    "permitted": "allow allows allowed allowable permit permits permitted permissible acceptable appropriate legal "
                 "lawful legitimate safe safely harmless benign comply complies compliant",
    "forbidden": "forbid forbids forbidden prohibit prohibits prohibited disallow disallows disallowed unacceptable "
                 "inappropriate illegal unlawful unsafe harmful dangerous malicious refuse refuses refused refusal "
                 "decline declines declined violate violates violation",
    "can": "can could may might", "must": "must shall required", "should": "should ought",
    "all": "all every each always entire entirely", "some": "some several sometimes partly partially",
    "few": "few rarely seldom", "many": "many most often usually mostly", "only": "only solely exclusively",
    "more": "more higher greater exceeds", "less": "less fewer lower",
    **dict(zip(map(str, range(2, 13)), "two three four five six seven eight nine ten eleven twelve".split())),
    "100": "hundred", "1000": "thousand", "1000000": "million",
}.items() for w in words.split()}


def stance_words(text: str) -> list[tuple[str, str]]:
    """(class, word) of each STANCE word or number in `text`; contractions count as `not`."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\b(?:cannot|can't)\b", "can not", re.sub(r"\bwon't\b", "will not", text)).replace("n't", " not")
    words = re.findall(r"\d[\d,]*(?:\.\d+)?|[a-z]+", text)
    return [(w.replace(",", "") if w[0].isdigit() else STANCE[w], w) for w in words if w[0].isdigit() or w in STANCE]


def disagreement(a: str, b: str) -> list[str]:
    """The stance words on which thoughts `a` and `b` differ, in order; [] when they agree."""
    wa, wb = stance_words(a), stance_words(b)
    ca, cb = [c for c, _ in wa], [c for c, _ in wb]
    differ = {c for c in ca + cb if ca.count(c) != cb.count(c)}
    return list(dict.fromkeys(w for c, w in wa + wb if c in differ))
