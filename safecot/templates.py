"""Policies and agent/judge templates, both plain files under data/ that anyone can read and edit.

A template is a text file named by its role (data/templates/deliberate.txt ...) with a
`[system]` part and a `[user]` part; `${name}` placeholders are filled from the stage (`$$` is a
literal `$`). A role's template is checked when it is loaded, before any model: it must use the
placeholders that carry what the role works on (the request, the thoughts under review ...) and
may use only those the stage fills (PLACEHOLDERS), so a template that lost `${prompt}` stops
with one line instead of running to the end with agents that never saw the prompt. A template whose answer is parsed has a JSON
schema beside it (deliberate.schema.json): with `llm.structured` the backend constrains the
answer to it (Template.schema; None when there is no schema file). A policy
set is a YAML file in one of two formats (see data/policies/README.md): detailed code-like rules
(deliberative alignment) or short codes augmented with illustrative cases (CADA).
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from .records import InputError, read_text

TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"


@dataclass
class PolicySet:
    format: str                 # detailed | cases
    policies: list[dict]        # each has id, title, and rules (detailed) or code + cases (cases)
    path: str

    @property
    def ids(self) -> list[str]:
        return [p["id"] for p in self.policies]

    def text(self, ids: list[str] | None = None) -> str:
        """The policies as the agents read them."""
        parts = []
        for p in self.policies:
            if ids and p["id"] not in ids:
                continue
            if self.format == "detailed":
                body = "\n".join(f"- {r}" for r in p["rules"])
            else:
                cases = "\n".join(f"  - Request: {c['request']} -> {c['decision']} ({c['reason']})" for c in p["cases"])
                body = f"Code: {p['code']}\nCases:\n{cases}"
            parts.append(f"## {p['title']} [{p['id']}]\n{body}")
        return "\n\n".join(parts)


def load_policies(path: str | Path) -> PolicySet:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: policy file not found")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    fmt = (data or {}).get("format")
    if fmt not in ("detailed", "cases"):
        raise InputError(f"{path}: 'format' must be 'detailed' or 'cases', got {fmt!r}")
    need = ("id", "title", "rules") if fmt == "detailed" else ("id", "title", "code", "cases")
    policies = data.get("policies") or []
    if not policies:
        raise InputError(f"{path}: no policies")
    for i, p in enumerate(policies):
        for key in need:
            if key not in p:
                raise InputError(f"{path}: policies[{i}] is missing '{key}'")
    return PolicySet(fmt, policies, str(path))


@dataclass
class Template:
    name: str
    system: str
    user: str
    schema: dict | None = None  # the answer's JSON schema (<name>.schema.json), if the answer is parsed

    def chat(self, **values) -> list[dict]:
        try:
            system = string.Template(self.system).substitute(values)
            user = string.Template(self.user).substitute(values)
        except KeyError as e:
            raise InputError(f"template '{self.name}': no value for ${{{e.args[0]}}}") from None
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


# Each role's placeholders: (needed, filled). `filled` is what the stage's `.chat(...)` passes (a
# template may use any of them); `needed` is what the role works on, which its template must use.
PLACEHOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # stage 1 (01_generate.py)
    "intent": (("prompt",), ("prompt",)),
    "initial_cot": (("prompt",), ("prompt", "policies", "intents")),
    "deliberate": (("prompt", "thoughts", "response"),
                   ("prompt", "policies", "intents", "thoughts", "response", "agent", "n_agents", "round")),
    # stage 2 (02_refine.py; grade_cot and judge_safety are stage 5's judges too)
    "refine": (("prompt", "thoughts"), ("prompt", "policies", "response", "thoughts")),
    "grade_cot": (("prompt", "thoughts", "response"), ("prompt", "policies", "response", "thoughts")),
    "plain_response": (("prompt",), ("prompt",)),
    "ear_whisperer": (("category",), ("category", "policies", "n", "examples", "history")),
    "belief_cot": (("prompt", "belief"), ("prompt", "policies", "belief")),
    "judge_safety": (("prompt", "answer"), ("prompt", "answer", "policies")),
    "task_cot": (("prompt",), ("prompt",)),
    "continue_cot": (("prompt", "thoughts"), ("prompt", "policies", "step", "thoughts")),
    # stage 4 (04_dpo.py, grpo)
    "reason_over_policies": (("prompt", "policies"), ("prompt", "policies")),
    "reward_judge": (("prompt", "response"), ("prompt", "response", "policies")),
    # stage 5 (safecot/judges.py, safecot/suites.py)
    "judge_refusal": (("prompt", "answer"), ("prompt", "answer", "policies")),
    "judge_strongreject": (("prompt", "answer"), ("prompt", "answer", "policies")),
    "mmlu_question": (("question", "choices"), ("question", "subject", "choices")),
}
_PART = re.compile(r"^\[(system|user)\]\s*$", re.M)


def load_template(name: str, folder: str | Path | None = None) -> Template:
    path = Path(folder or TEMPLATES) / f"{name}.txt"
    if not path.is_file():
        raise InputError(f"{path}: template not found")
    text = read_text(path)
    parts = _PART.split(text)
    sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    if "user" not in sections:
        raise InputError(f"{path}: a template needs a [user] part")
    heads = list(_PART.finditer(text))
    check_placeholders(path, name, text, [(h.end(), nxt.start() if nxt else len(text))
                                          for h, nxt in zip(heads, heads[1:] + [None])])
    schema_path = path.with_name(f"{name}.schema.json")
    schema = None
    if schema_path.is_file():
        try:
            schema = json.loads(read_text(schema_path))
        except json.JSONDecodeError as e:
            raise InputError(f"{schema_path}: not valid JSON: {e}") from None
    return Template(name, sections.get("system", ""), sections["user"], schema)


def check_placeholders(path: Path, name: str, text: str, spans: list[tuple[int, int]]) -> None:
    """Every `$` of the template's parts (`spans` of `text`) is `$$` or a placeholder its role is
    filled with, and the role's needed placeholders are all there; else an InputError naming the
    file and line. A name not in PLACEHOLDERS has only its `$`s checked."""
    needed, filled = PLACEHOLDERS.get(name, ((), None))
    used = set()
    for start, end in spans:
        for m in string.Template.pattern.finditer(text, start, end):
            line = text.count("\n", 0, m.start()) + 1
            if m.group("invalid") is not None:
                shown = re.match(r"\$\{?\w{0,12}\}?", text[m.start():end]).group(0)
                raise InputError(f"{path}:{line}: invalid placeholder '{shown}' (a value is ${{name}}; "
                                 "write $$ for a literal $)")
            key = m.group("named") or m.group("braced")
            if key is None:  # $$
                continue
            if filled is not None and key not in filled:
                raise InputError(f"{path}:{line}: unknown placeholder ${{{key}}}: the '{name}' template is filled with "
                                 f"{', '.join(f'${{{k}}}' for k in filled)} (write $$ for a literal $)")
            used.add(key)
    missing = [k for k in needed if k not in used]
    if missing:
        raise InputError(f"{path}: the '{name}' template lacks {', '.join(f'${{{k}}}' for k in missing)}: "
                         f"the agent would never see the {', '.join(missing)}")


def policy_chat(policies: str | None, templates: str | Path | None = None):
    """prompt -> chat, as a model is asked under a policy setting: reason_over_policies.txt's system
    turn with the codes, then the prompt (CADA's GRPO trains with it, and stage 5's `policy_prompt`
    evaluates under the very same rendering), or the bare prompt when `policies` is None."""
    if not policies:
        return lambda prompt: [{"role": "user", "content": prompt}]
    tpl, codes = load_template("reason_over_policies", templates), load_policies(policies).text()
    return lambda prompt: tpl.chat(policies=codes, prompt=prompt)
