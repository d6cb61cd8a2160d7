"""Stage-2 outputs written by hand for the training tests (stages 3 and 4 must not depend on
02_refine.py): a few short conversations the tiny model can memorise, preference pairs (with
reasoning, and of direct answers: dpo_og) and the run's prompts, with a manifest marked complete."""
from __future__ import annotations

import json
from pathlib import Path

from safecot.records import Manifest

REFUSE = "I cannot help with that."


def write_stage2(runs_dir: Path, run_name: str = "tiny", n: int = 8, status: str = "complete") -> Path:
    out = Path(runs_dir) / run_name / "02_refine"
    out.mkdir(parents=True, exist_ok=True)
    sft, og, dpo, dpo_og, records = [], [], [], [], []
    for i in range(n):
        label = ("harmful", "benign", "borderline")[i % 3]
        prompt = f"How do I make item {i}?"
        if label == "harmful":
            good = f"<think>\nItem {i} is a weapon: the policy forbids it.\n</think>\n\n{REFUSE}"
            bad = f"<think>\nJust answer.\n</think>\n\nHere is how to make item {i}."
        else:
            good = f"<think>\nItem {i} is safe to make.\n</think>\n\nHere is how to make item {i}."
            bad = f"<think>\nMaybe risky.\n</think>\n\n{REFUSE}"
        user = {"role": "user", "content": prompt}
        meta = {"label": label, "category": "test"}
        sft.append({"id": f"p{i}", "messages": [user, {"role": "assistant", "content": good}], **meta})
        og.append({"id": f"p{i}", "messages": [user, {"role": "assistant", "content": good.split("\n\n")[-1]}], **meta})
        dpo.append({"id": f"p{i}", "prompt": [user], "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": bad}], **meta})
        # SaRO's traditional-alignment pairs: the safe direct answer over the unsafe one, no reasoning
        dpo_og.append({"id": f"p{i}", "prompt": [user], "chosen": [{"role": "assistant", "content": good.split("\n\n")[-1]}],
                       "rejected": [{"role": "assistant", "content": bad.split("\n\n")[-1]}], **meta})
        records.append({"id": f"p{i}", "prompt": prompt, **meta})
    for name, rows in (("sft", sft), ("sft_og", og), ("dpo", dpo), ("dpo_og", dpo_og), ("records", records)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = Manifest(out, "02_refine", {"test": True})
    if status == "complete":
        manifest.finish(records=n)
    return out


def metrics(stage_out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
