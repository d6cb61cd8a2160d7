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


def thought_numbers(text: str, n: int) -> set[int]:
    """Thought numbers as a refiner writes them: `1, 3, 4`, `1-12` (1..12), `1-3, 7`; at most n."""
    out = set()
    for a, b in re.findall(_RANGE, text):
        lo, hi = sorted((int(a), int(b or a)))
        out.update(range(lo, min(hi, n) + 1))
    return out


def removal_reason(text: str) -> str:
    """A refiner's reason as one of the template's four names ("Policy-inconsistent, because..."
    -> policy_inconsistent); anything else is kept as the refiner wrote it, in snake case."""
    name = re.sub(r"[^a-z]+", "_", text.lower()).strip("_")
    return next((r for r in REMOVAL_REASONS if name.startswith(r)), name or "removed_by_refiner")


def parse_refinement(text: str, n: int) -> tuple[set[int], dict[int, str], str]:
    """A refiner's verdict on n numbered thoughts -> (kept numbers, {removed number: reason},
    response), from the template's sections or the JSON object of refine.schema.json."""
    def removed(number: str, reason: str) -> dict[int, str]:
        return dict.fromkeys(thought_numbers(number, n), removal_reason(reason))

    obj = json_object(text)
    if obj and "keep" in obj:
        keep = set().union(*(thought_numbers(str(k), n) for k in (obj["keep"] if isinstance(obj["keep"], list) else [obj["keep"]])))
        reasons = {}
        for x in obj.get("remove") or []:
            if isinstance(x, dict) and "thought" in x:  # {"thought": 4, "reason": "redundant"}
                reasons.update(removed(str(x["thought"]), str(x.get("reason") or "")))
            elif isinstance(x, str) and (m := re.match(_RANGE + r"\W+(.+)", x)):
                reasons.update(removed(f"{m[1]}-{m[2] or m[1]}", m[3]))
        return keep, reasons, str(obj.get("response") or "").strip()
    s = sections(text, ["keep", "remove", "response"])
    reasons = {}
    for m in (re.match(_RANGE + r"\W+(.+)", x) for x in items(s.get("remove", ""))):
        if m:  # `- 4: redundant`, `- 5-7: repetitive`
            reasons.update(removed(f"{m[1]}-{m[2] or m[1]}", m[3]))
    return thought_numbers(s.get("keep", ""), n), reasons, s.get("response", "").strip()
