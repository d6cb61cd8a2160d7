"""Policies and agent/judge templates, both plain files under data/ that anyone can read and edit.

A template is a text file named by its role (data/templates/deliberate.txt ...) with a
`[system]` part and a `[user]` part; `${name}` placeholders are filled from the stage. A template whose answer is parsed has a JSON
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

from .records import InputError

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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def load_template(name: str, folder: str | Path | None = None) -> Template:
    path = Path(folder or TEMPLATES) / f"{name}.txt"
    if not path.is_file():
        raise InputError(f"{path}: template not found")
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^\[(system|user)\]\s*$", text, flags=re.M)
    sections = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
    if "user" not in sections:
        raise InputError(f"{path}: a template needs a [user] part")
    schema_path = path.with_name(f"{name}.schema.json")
    schema = None
    if schema_path.is_file():
        try:
            schema = json.loads(schema_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{schema_path}: not valid JSON: {e}") from None
    return Template(name, sections.get("system", ""), sections["user"], schema)
