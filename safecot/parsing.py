"""Lenient parsing of agent outputs.

Agents are asked for labelled sections (THOUGHTS:, RESPONSE:, VERDICT: ...). Real models drift:
markdown headers, bold labels, numbered or bulleted lists, JSON. With `llm.structured` they
answer with the JSON object of the template's schema (data/templates/<role>.schema.json), read
first by every parser here. These parsers accept all of that and say whether they succeeded; the stage keeps the raw text either way and counts the
failures, so a bad output never stops a run.
"""
from __future__ import annotations

import json
import re

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|\(\d+\)|step\s*\d+\s*[:.)-])\s*", re.I)


def sections(text: str, names: list[str]) -> dict[str, str]:
    """Split `text` at lines that start with one of `names` used as a label (any case,
    optionally in markdown: `## Thoughts`, `**Response:**`). Returns {name: body}."""
    alt = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"^[ \t>#*_]*({alt})[ \t*_]*(?::|\n|$)[ \t*_]*", re.I | re.M)
    found = list(pattern.finditer(text))
    out = {}
    for m, nxt in zip(found, found[1:] + [None]):
        key = m.group(1).lower()
        body = text[m.end(): nxt.start() if nxt else len(text)].strip()
        out.setdefault(key, body)  # the first occurrence wins; models sometimes repeat the format
    return out


def items(text: str) -> list[str]:
    """A list written one item per line, with or without bullets or numbers."""
    out = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip()
        if line and line.lower() not in ("none", "n/a", "-"):
            out.append(line)
    return out


def json_object(text: str) -> dict | None:
    """The JSON object in `text` (a structured answer, or one a model wrote unasked, in a code
    fence or after a preamble), its keys in lower case; None if there is none that parses."""
    text = (text or "").rsplit("</think>", 1)[-1]  # reasoning a server returned apart is no answer
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1], strict=False)  # control characters inside strings: grammars allow them
    except json.JSONDecodeError:
        return None
    return {k.lower(): v for k, v in obj.items()} if isinstance(obj, dict) else None


def as_list(value) -> list[str]:
    """A JSON list of strings (numbering a model kept inside an item removed), or a string read
    one item per line."""
    if isinstance(value, list):
        return [t for t in (_BULLET.sub("", str(v)).strip() for v in value if v is not None) if t]
    return items(str(value or ""))


def parse_intents(text: str) -> tuple[dict, bool]:
    """-> ({"explicit": [...], "implicit": [...]}, parsed)"""
    obj = json_object(text)
    if obj and ("explicit" in obj or "implicit" in obj):
        found = {"explicit": as_list(obj.get("explicit", [])), "implicit": as_list(obj.get("implicit", []))}
        return found, bool(found["explicit"] or found["implicit"])
    s = sections(text, ["explicit intents", "implicit intents", "explicit", "implicit"])
    explicit = items(s.get("explicit intents", s.get("explicit", "")))
    implicit = items(s.get("implicit intents", s.get("implicit", "")))
    return {"explicit": explicit, "implicit": implicit}, bool(explicit or implicit)


def parse_cot(text: str) -> tuple[list[str], str, bool]:
    """-> (thoughts, response, parsed): a chain of thought and the response it leads to."""
    obj = json_object(text)
    if obj and "thoughts" in obj and "response" in obj:
        thoughts, response = as_list(obj["thoughts"]), str(obj["response"] or "").strip()
        return thoughts, response, bool(thoughts and response)
    s = sections(text, ["thoughts", "response"])
    thoughts, response = items(s.get("thoughts", "")), s.get("response", "").strip()
    return thoughts, response, bool(thoughts and response)


AGREE_PHRASE = re.compile(r"\bI agree with the previous agent\b", re.I)


def parse_review(text: str) -> tuple[str, list[str], str]:
    """A deliberator's turn -> (verdict, thoughts, response), verdict in agree|revise|unparsed.
    A revision must carry thoughts; its response may be omitted (the current one stands)."""
    obj = json_object(text)
    if obj and "verdict" in obj:
        verdict = str(obj["verdict"]).strip().lower()
        if verdict.startswith("agree"):
            return "agree", [], ""
        thoughts = as_list(obj.get("thoughts", []))
        return ("revise" if thoughts else "unparsed"), thoughts, str(obj.get("response") or "").strip()
    s = sections(text, ["verdict", "thoughts", "response"])
    verdict = s.get("verdict", "").split("\n")[0].strip().lower()
    if verdict.startswith("agree") or (not verdict and not s.get("thoughts") and AGREE_PHRASE.search(text)):
        return "agree", [], ""
    thoughts = items(s.get("thoughts", ""))
    if thoughts:
        return "revise", thoughts, s.get("response", "").strip()
    return "unparsed", [], ""


REMOVAL_REASONS = ("repetitive", "redundant", "deceptive", "policy_inconsistent")
_RANGE = r"(\d+)(?:\s*(?:-|\u2013|\u2014|to)\s*(\d+))?"
# One number or range of a listed value, after the separators a refiner puts between them (commas,
# 'and', '&', ';', whitespace) and a '#' it may put before one.
_LISTED = re.compile(r"(?:\s|,|;|&|\band\b)*#?" + _RANGE, re.I)
# What may open a list: bullets, a bracket, the word "thoughts" ("KEEP: thoughts 1, 3 and 4").
_LEAD = re.compile(r"\s*(?:[-*\u2022]\s+|\[\s*|thoughts?\b\s*)*", re.I)
# A kept thought written out after its number, one per line: "3. [initial] The request is benign."
_NUMBERED_ITEM = re.compile(r"\s*#?\d+\s*[.):]\s+\S")


def _listed(line: str, n: int) -> tuple[set[int], str]:
    """The numbers and ranges at the start of one line (at most n), and the rest of the line: the
    list ends at the first thing that is not a number, range, comma, 'and' or whitespace."""
    out, pos = set(), 0
    line = _LEAD.sub("", line, count=1)
    while m := _LISTED.match(line, pos):
        lo, hi = sorted((int(m[1]), int(m[2] or m[1])))
        out.update(range(lo, min(hi, n) + 1))
        pos = m.end()
    return out, line[pos:].strip()


def thought_numbers(text: str, n: int) -> set[int]:
    """The thought numbers a refiner's value lists: `1, 3, 4`, `1-12` (1..12), `1-3, 7`, `2 and 5`;
    at most n. Only the list is read, never a number in a comment after it: `1, 3 (thought 5 is
    redundant)` keeps 1 and 3. A list written one number (or numbered thought) per line is read
    line by line, up to the first line that is something else."""
    out = set()
    for i, line in enumerate(text.strip().splitlines()):
        numbers, rest = _listed(line, n)
        whole = not rest or bool(_NUMBERED_ITEM.match(line))
        if i and not (numbers and whole):  # prose after the list ("Thought 5 repeats 2.") names nothing
            break
        out |= numbers
        if not whole:
            break
    return out


def removal_reason(text: str) -> str:
    """A refiner's reason as one of the template's four names ("Policy-inconsistent, because..."
    -> policy_inconsistent); anything else is kept as the refiner wrote it, in snake case."""
    name = re.sub(r"[^a-z]+", "_", text.lower()).strip("_")
    return next((r for r in REMOVAL_REASONS if name.startswith(r)), name or "removed_by_refiner")


def parse_refinement(text: str, n: int) -> tuple[set[int], dict[int, str], str]:
    """A refiner's verdict on n numbered thoughts -> (kept numbers, {removed number: reason},
    response), from the template's sections or the JSON object of refine.schema.json. A thought
    listed under both KEEP and REMOVE is removed: a removal names its reason, a KEEP list is often
    "the rest" written loosely, and a thought kept by mistake trains the student on it."""
    reasons: dict[int, str] = {}

    def remove(item: str) -> None:  # `4: redundant`, `5-7 (repetitive)`, `Thought 2 - deceptive`
        numbers, rest = _listed(item, n)
        reasons.update(dict.fromkeys(numbers, removal_reason(rest)))

    obj = json_object(text)
    if obj and "keep" in obj:
        keep = set().union(*(thought_numbers(str(k), n) for k in (obj["keep"] if isinstance(obj["keep"], list) else [obj["keep"]])))
        for x in obj.get("remove") or []:
            if isinstance(x, dict) and "thought" in x:  # {"thought": 4, "reason": "redundant"}
                reasons.update(dict.fromkeys(thought_numbers(str(x["thought"]), n), removal_reason(str(x.get("reason") or ""))))
            elif isinstance(x, (str, int)):
                remove(str(x))
        return keep - set(reasons), reasons, str(obj.get("response") or "").strip()
    s = sections(text, ["keep", "remove", "response"])
    for line in s.get("remove", "").splitlines():
        if line.strip().lower().strip("-*. ") not in ("", "none", "n/a"):
            remove(line)
    return thought_numbers(s.get("keep", ""), n) - set(reasons), reasons, s.get("response", "").strip()


def numbered(lines: list[str]) -> str:
    """Thoughts or intents as the agents read them: `1. ...` a line, `(none)` for none."""
    return "\n".join(f"{i}. {t}" for i, t in enumerate(lines, 1)) or "(none)"


def intents_text(intents: dict | None) -> str:
    """The intents as stage 1's initial CoT reads them (and stage 2's sampled pairs again)."""
    intents = intents or {}
    return f"Explicit:\n{numbered(intents.get('explicit', []))}\nImplicit:\n{numbered(intents.get('implicit', []))}"
