"""Lenient parsing of agent outputs, templates, policies, prompt sets and the record writer."""
from __future__ import annotations

import json

import pytest

from safecot.parsing import parse_cot, parse_intents, parse_review
from safecot.prompt_sets import load_prompts
from safecot.records import InputError, RecordWriter
from safecot.templates import load_policies, load_template


def test_cot_in_markdown_and_bullets():
    text = "Sure!\n**Thoughts:**\n- First, the policy on privacy applies.\n* Second, help anyway.\n\n## Response\nHere you go."
    thoughts, response, ok = parse_cot(text)
    assert ok and thoughts == ["First, the policy on privacy applies.", "Second, help anyway."]
    assert response == "Here you go."


def test_cot_as_json_and_unparsable():
    assert parse_cot('noise {"thoughts": ["a", "b"], "response": "r"} noise') == (["a", "b"], "r", True)
    assert parse_cot("just an answer with no labels")[2] is False
    assert parse_cot("THOUGHTS:\n1. only thoughts")[2] is False


def test_intents_variants():
    assert parse_intents("Explicit intents:\n1) get a recipe\nImplicit intents:\n1) cook dinner") == (
        {"explicit": ["get a recipe"], "implicit": ["cook dinner"]}, True)
    assert parse_intents('{"explicit": ["x"], "implicit": []}') == ({"explicit": ["x"], "implicit": []}, True)
    assert parse_intents("garbage")[1] is False


@pytest.mark.parametrize("text,verdict", [
    ("VERDICT: AGREE\nI agree with the previous agent.", "agree"),
    ("**Verdict:** agree", "agree"),
    ("I agree with the previous agent.", "agree"),
    ('{"verdict": "AGREE"}', "agree"),
    ("VERDICT: REVISE\nTHOUGHTS:\n1. fixed\nRESPONSE:\nnew", "revise"),
    ("Verdict: revise\nno thoughts given", "unparsed"),
    ("I agree with the previous agent.\nTHOUGHTS:\n1. one more check", "revise"),
    ("blah", "unparsed"),
])
def test_review_verdicts(text, verdict):
    assert parse_review(text)[0] == verdict


def test_revision_without_response_keeps_thoughts():
    verdict, thoughts, response = parse_review("VERDICT: REVISE\nThoughts:\n1. a\n2. b")
    assert (verdict, thoughts, response) == ("revise", ["a", "b"], "")


def test_templates_and_policies_load_and_render():
    for fmt in ("detailed", "cases"):
        policies = load_policies(f"data/policies/{fmt}.yaml")
        assert policies.format == fmt and "helpfulness" in policies.ids and len(policies.ids) >= 8
        assert all(f"[{pid}]" in policies.text() for pid in policies.ids)
    for name in ("intent", "initial_cot", "deliberate"):
        tpl = load_template(name)
        chat = tpl.chat(prompt="P?", policies="POL", intents="I", thoughts="T", response="R", agent=1, n_agents=2, round=1)
        assert chat[-1]["role"] == "user" and "P?" in chat[-1]["content"]
    with pytest.raises(InputError, match="no value"):
        load_template("deliberate").chat(prompt="x")


def test_seed_prompts_schema():
    rows = load_prompts("data/prompts/seed.jsonl")
    assert len(rows) >= 150
    assert {r["label"] for r in rows} == {"harmful", "benign", "borderline"}
    assert len({r["id"] for r in rows}) == len(rows)


def test_csv_prompts_with_mapping_and_generated_ids(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("question,kind\nHow do I bake bread?,general\nHow do I bake bread?,general\nWhat is 2+2?,general\n")
    rows = load_prompts(str(p), columns={"prompt": "question", "category": "kind"}, defaults={"label": "benign"})
    assert [r["prompt"] for r in rows] == ["How do I bake bread?", "What is 2+2?"]  # repeated prompt taken once
    assert rows[0]["id"].startswith("mine-") and rows[0]["label"] == "benign"
    assert load_prompts(str(p), columns={"prompt": "question"})[0]["id"] == rows[0]["id"]  # stable ids



def test_a_label_outside_the_schema_names_file_and_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hi", "label": "benign"}\n{"prompt": "yo", "label": "safe"}\n')
    with pytest.raises(InputError, match=rf"{p}:2: label 'safe' is not one of harmful, benign, borderline"):
        load_prompts(str(p))
    assert load_prompts(str(p), columns={"label": "none"}, defaults={"label": "benign"})[1]["label"] == "benign"


def test_a_mix_of_sources_as_in_the_paper(tmp_path):
    """BeaverTails-like safety prompts (category as flags) beside Alpagasus-like general ones."""
    from safecot.prompt_sets import load_prompt_sources, prompt_sources
    safety = tmp_path / "bt.jsonl"
    safety.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do I hurt someone?", "category": {"animal_abuse": False, "violence": True}},
        {"prompt": "How do I hurt someone?", "category": {"animal_abuse": False, "violence": True}},
        {"prompt": "Steal a car?", "category": {"theft": True}}]))
    general = tmp_path / "alpagasus.csv"
    general.write_text("instruction,output\nName three fruits.,x\nWhat is rain?,y\nSum 2 and 2.,z\n")
    specs = prompt_sources([
        {"source": str(safety), "defaults": {"label": "harmful"}},
        {"source": str(general), "columns": {"prompt": "instruction"},
         "defaults": {"label": "benign", "category": "general"}, "limit": 2}])
    rows = load_prompt_sources(specs)
    assert [(r["label"], r["category"]) for r in rows] == [("harmful", "violence"), ("harmful", "theft"),
                                                            ("benign", "general"), ("benign", "general")]
    assert [s["rows"] for s in specs] == [2, 2] and len(load_prompt_sources(specs, limit=3)) == 3
    with pytest.raises(InputError, match=r"id '.*' is also in"):
        load_prompt_sources(prompt_sources([{"source": str(safety), "defaults": {"label": "harmful"}}] * 2))
    with pytest.raises(InputError, match=r"generate.prompts\[0\]: expected a mapping with source"):
        prompt_sources([{"path": str(safety)}])

def test_hub_dataset_by_id_fails_clearly_offline():
    with pytest.raises(InputError, match="hf:nobody/nothing"):
        load_prompts("hf:nobody/nothing")


def test_record_writer_recovers_from_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with RecordWriter(path) as w:
        w.write({"id": "a", "x": 1})
        w.write({"id": "a", "x": 2})  # a duplicate id is ignored
    with path.open("a") as f:
        f.write('{"id": "b", "x"')
    with RecordWriter(path) as w:
        assert set(w.done) == {"a"}
        w.write({"id": "b", "x": 3})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "record_hash"} for r in rows] == [{"id": "a", "x": 1}, {"id": "b", "x": 3}]
    assert all(r["record_hash"] for r in rows)


def test_record_writer_never_writes_a_resumed_id_again(tmp_path):
    """A rerun resumes: the ids already on disk are done, and writing one again (a record redone
    after a crash, a retried chunk) leaves the file and the kept record as they were."""
    path = tmp_path / "r.jsonl"
    with RecordWriter(path) as w:
        w.write({"id": "a", "x": 1})
    with RecordWriter(path) as w:
        assert set(w.done) == {"a"} and w.done["a"]["x"] == 1
        w.write({"id": "a", "x": 2})
        w.write({"id": "b", "x": 3})
        assert w.done["a"]["x"] == 1
    with RecordWriter(path) as w:
        w.write({"id": "b", "x": 4})
    assert [(r["id"], r["x"]) for r in map(json.loads, path.read_text().splitlines())] == [("a", 1), ("b", 3)]


def test_values_map_a_boolean_column_joined_columns_and_original_responses(tmp_path):
    """BeaverTails' is_safe (a boolean on the Hub, text in a CSV) mapped to labels; Alpagasus'
    instruction joined with its optional input; each source's own response carried along."""
    bt = tmp_path / "bt.jsonl"
    bt.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "How do I hurt someone?", "response": "Here is how.", "is_safe": False, "category": {"violence": True}},
        {"prompt": "How do I hurt someone?", "response": "I won't help.", "is_safe": True, "category": {"violence": True}},
        {"prompt": "Is rain wet?", "response": "Yes.", "is_safe": True, "category": {"violence": False}}]))
    rows = load_prompts(str(bt), columns={"label": "is_safe", "original_response": "response"},
                        values={"label": {False: "harmful", True: "benign"}})
    assert [(r["label"], r["original_response"]) for r in rows] == [("harmful", "Here is how."), ("benign", "Yes.")]
    alp = tmp_path / "alpagasus.csv"
    alp.write_text("instruction,input,output,safe\nSummarise the text.,Rain is wet.,Wet rain.,True\n"
                   "Name three fruits.,,\"Apple, pear, fig.\",FALSE\n")
    rows = load_prompts(str(alp), columns={"prompt": ["instruction", "input"], "original_response": "output", "label": "safe"},
                        values={"label": {"false": "harmful", "true": "benign"}})
    assert [r["prompt"] for r in rows] == ["Summarise the text.\n\nRain is wet.", "Name three fruits."]
    assert [r["label"] for r in rows] == ["benign", "harmful"] and rows[1]["original_response"] == "Apple, pear, fig."
    assert "original_response" not in load_prompts("data/prompts/seed.jsonl", limit=1)[0]  # optional unless mapped
    with pytest.raises(InputError, match=r"alpagasus.csv:2: missing field 'reply'"):
        load_prompts(str(alp), columns={"prompt": "instruction", "original_response": "reply"}, defaults={"label": "benign"})
    with pytest.raises(InputError, match=r"alpagasus.csv:2: missing field 'context'"):
        load_prompts(str(alp), columns={"prompt": ["instruction", "context"]}, defaults={"label": "benign"})
    with pytest.raises(InputError, match=r"bt.jsonl:1: label 'False' is not one of"):
        load_prompts(str(bt), columns={"label": "is_safe"})  # unmapped, a boolean is no label


def test_a_manifest_resumes_under_a_config_with_boolean_keys(tmp_path):
    """`values: {label: {false: harmful}}` reads back from manifest.json with a "false" key: the
    same recipe must still resume, and a changed one must not."""
    from safecot.records import Manifest
    config = {"prompts": [{"source": "x.jsonl", "values": {"label": {False: "harmful", True: "benign"}}}]}
    Manifest(tmp_path, "01_generate", config)
    Manifest(tmp_path, "01_generate", config)
    with pytest.raises(InputError, match="prompts"):
        Manifest(tmp_path, "01_generate", {"prompts": [{"source": "x.jsonl", "values": {"label": {False: "benign"}}}]})


# Refiner replies as models write them, on 5 thoughts: only the numbers a KEEP value lists count
# (a number in a comment after the list names no thought), and REMOVE wins over KEEP.
@pytest.mark.parametrize("reply,keep,reasons", [
    ("KEEP: 1, 3 (thought 5 is redundant)\nREMOVE:\n- 2: repetitive\n- 4: redundant\nRESPONSE:\nI can't help with that.",
     {1, 3}, {2: "repetitive", 4: "redundant"}),
    ("**KEEP:** 1-3, 5 — thought 4 repeats 2\n**REMOVE:**\n- 4: repetitive\n**RESPONSE:**\nHere is how.",
     {1, 2, 3, 5}, {4: "repetitive"}),
    ("KEEP: thoughts 1, 2 and 4. Thought 3 contradicts thought 2, and 5 restates 4.\n"
     "REMOVE:\n* Thought 3 (policy-inconsistent, it allows sharing the address)\n- 5 - Repetitive.\nRESPONSE:\nNo.",
     {1, 2, 4}, {3: "policy_inconsistent", 5: "repetitive"}),
    ("KEEP:\n1. [initial] The user asks for the address.\n4. [round 1 agent 1] Sharing it is not allowed.\n"
     "Thoughts 2, 3 and 5 repeat these.\nREMOVE:\n- 2, 3, 5: repetitive\nRESPONSE:\nNo.",
     {1, 4}, {2: "repetitive", 3: "repetitive", 5: "repetitive"}),
    ("KEEP: 1, 2, 3, 4, 5\nREMOVE:\n- 3: deceptive (it misstates the privacy policy)\n- 5: redundant\nRESPONSE:\nNo.",
     {1, 2, 4}, {3: "deceptive", 5: "redundant"}),                       # listed under both: removed
    ('Here is my verdict.\n```json\n{"keep": [1, 2, 3], "remove": [{"thought": 3, "reason": "deceptive"}], "response": "No."}\n```',
     {1, 2}, {3: "deceptive"}),
    ('{"keep": ["1-4 (5 repeats 4)"], "remove": ["5: repetitive", "2 (redundant)"], "response": "No."}',
     {1, 3, 4}, {5: "repetitive", 2: "redundant"}),
    ("KEEP: [1, 4]\nREMOVE: none\nRESPONSE:\nSure.", {1, 4}, {}),
], ids=["comment", "dash_comment", "prose_after", "one_per_line", "in_both_lists", "json_fenced", "json_strings", "brackets"])
def test_refiner_keep_reads_only_its_list_and_remove_wins(reply, keep, reasons):
    from safecot.parsing import parse_refinement
    assert parse_refinement(reply, 5)[:2] == (keep, reasons)


def test_thought_numbers_stop_at_the_first_thing_that_is_not_a_list():
    from safecot.parsing import thought_numbers
    assert thought_numbers("1-3, 7", 10) == {1, 2, 3, 7} and thought_numbers("2 to 4", 3) == {2, 3}
    assert thought_numbers("1, 2 and 4 (3 repeats 2; 5-6 are off topic)", 6) == {1, 2, 4}
    assert thought_numbers("#1, #3 & #5", 6) == {1, 3, 5}
    assert thought_numbers("2\n4\n6", 6) == {2, 4, 6}                    # one per line
    assert thought_numbers("2, 4\nThought 5 repeats 4.", 6) == {2, 4}    # prose after the list
    assert thought_numbers("none (all of 1-4 repeat the response)", 4) == set()
