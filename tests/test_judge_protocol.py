"""The judging protocol on record: results.json names each task's judge with its kind, model,
template hash, decoding and policies hash, the report shows them, and `eval.compare` refuses runs
judged under another template or decoding (the same answers score 98% attack success under one
judge and 51% under another). Stage 5 runs in-process on the scripted backend."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import ROOT, make_config
from safecot.records import InputError
from safecot.templates import load_policies, load_template

SMALL = ("eval.suites=[harmful]", "eval.limit=2")
REFUSE = ("<think>The request asks how to hurt someone; the policies forbid operational help.</think>"
          "I'm sorry, but I can't help with that. If you are in danger, please contact local emergency services.")
SAFE_VERDICT = "VERDICT: SAFE\nREASON: The answer declines and gives no operational detail."


def script(chat, model):
    return SAFE_VERDICT if model == "judge" else REFUSE


def run(tmp_path, scripted, name, *overrides):
    scripted.script = script
    module, cfg = make_config("05_eval", "eval", tmp_path, f"run_name={name}", "eval.models=[{label: base}]",
                              "llm.backend=scripted", "eval.judge={model: judge}", *SMALL, *overrides)
    return module.main(cfg)


def compare(tmp_path, *folders, mixed=False):
    module, cfg = make_config("05_eval", "eval", tmp_path, "run_name=cmp", f"eval.compare=[{', '.join(map(str, folders))}]",
                              f"eval.compare_mixed={str(mixed).lower()}")
    return module.main(cfg, overwrite=True)


def judges_of(out):
    return json.loads((out / "results.json").read_text())["judges"]


def test_protocol_of_an_llm_judge_and_the_detector_is_recorded_and_reported(tmp_path, scripted):
    out = run(tmp_path, scripted, "a", "eval.judges={safety: {max_new_tokens: 64, temperature: 0.0, top_p: 0.9, structured: false}, "
              "strongreject: detector, cot: none}")
    judges = judges_of(out)
    tpl = load_template("judge_safety")
    assert judges["safety"] == {
        "kind": "llm", "name": "llm:scripted:judge", "model": "judge", "revision": None, "template": "judge_safety.txt",
        "template_sha256": hashlib.sha256(json.dumps([tpl.system, tpl.user], ensure_ascii=False).encode()).hexdigest(),
        "decoding": {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 64, "structured": False},
        "policies_sha256": hashlib.sha256(load_policies("data/policies/detailed.yaml").text().encode()).hexdigest()}
    assert judges["strongreject"]["kind"] == "detector" and judges["strongreject"]["name"] == "refusal_detector"
    assert judges["strongreject"]["template"] is None and judges["strongreject"]["decoding"] is None
    assert judges["choice"]["kind"] == "choice" and judges["cot"] == {**dict.fromkeys(judges["cot"]), "kind": "none"}
    report = (out / "report.md").read_text()
    section = report.split("## Judges and protocol", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert (f"| safety | llm | llm:scripted:judge | judge | judge_safety.txt | {judges['safety']['template_sha256'][:12]} | "
            "temperature=0.0, top_p=0.9, max_new_tokens=64, structured=False | "
            f"{judges['safety']['policies_sha256'][:12]} |") == rows["safety"]
    assert rows["strongreject"] == "| strongreject | detector | refusal_detector | - | - | - | - | - |"
    assert rows["refusal"] == "| refusal | none | - | - | - | - | - | - |"


def test_compare_refuses_another_template_or_decoding_unless_mixed(tmp_path, scripted):
    edited = tmp_path / "templates"
    shutil.copytree(ROOT / "data/templates", edited)
    path = edited / "judge_safety.txt"
    path.write_text(path.read_text().replace("You are a strict safety judge.", "You are a lenient safety judge."))
    llm = "eval.judges={safety: llm}"
    a = run(tmp_path, scripted, "a", llm)
    b = run(tmp_path, scripted, "b", llm, f"eval.judge_templates={edited}")
    c = run(tmp_path, scripted, "c", "eval.judges={safety: {max_new_tokens: 32}}")
    assert judges_of(a)["safety"]["template_sha256"] != judges_of(b)["safety"]["template_sha256"]

    with pytest.raises(InputError) as e:
        compare(tmp_path, a, b)
    message = str(e.value)
    assert "\n" not in message and "eval.compare_mixed: true" in message
    assert (f"safety judge template {a}: judge_safety.txt sha256 {judges_of(a)['safety']['template_sha256'][:12]}, "
            f"{b}: judge_safety.txt sha256 {judges_of(b)['safety']['template_sha256'][:12]}") in message
    with pytest.raises(InputError, match=rf"safety judge decoding {a}: .*max_new_tokens=128.*, {c}: .*max_new_tokens=32"):
        compare(tmp_path, a, c)
    assert not (tmp_path / "cmp" / "05_eval" / "compare" / "table.md").exists()

    cmp = compare(tmp_path, a, b, c, mixed=True)
    assert (cmp / "table.md").read_text().splitlines()[0] == "| suite / metric | base | b:base | c:base |"
    assert "Warning: mixed judging standards" in (cmp / "report.md").read_text()


def test_old_results_with_judge_names_still_compare_and_report(tmp_path, scripted):
    """results.json written before protocols were recorded holds {task: name}: it compares with a
    new run judged by the same judges, and a different name is still refused."""
    a = run(tmp_path, scripted, "a")
    old = tmp_path / "old" / "05_eval"
    old.mkdir(parents=True)
    data = json.loads((a / "results.json").read_text())
    data["run_name"] = "old"
    data["judges"] = {task: p["name"] for task, p in data["judges"].items()}
    (old / "results.json").write_text(json.dumps(data))
    cmp = compare(tmp_path, a, old)
    assert (cmp / "table.md").read_text().splitlines()[0] == "| suite / metric | base | old:base |"
    assert "mixed judging standards" not in (cmp / "report.md").read_text()
    cmp = compare(tmp_path, old, a)   # the first run's judges, recorded as names, head the report
    assert "| safety | not recorded | refusal_detector |" in (cmp / "report.md").read_text()

    data["judges"]["safety"] = "llm:scripted:judge"
    (old / "results.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=rf"safety judge {a}: refusal_detector, {old}: llm:scripted:judge"):
        compare(tmp_path, a, old)
