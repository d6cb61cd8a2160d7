"""Structured outputs (`llm.structured`): every parsed role's JSON schema beside its template, what
each backend sends or decodes with it, and the parsers reading the JSON objects as well as the
labelled free text. The hf backend runs the tiny model under the grammar for real (few tokens)."""
from __future__ import annotations

import json
import sys
import types

import jsonschema
import pytest

from conftest import load_script
from openai_server import OpenAITestServer
from safecot import backends
from safecot.backends import Agent, LLMConfig, cap_strings, per_chat, vllm_structured
from safecot.grading import CRITERIA, parse_grades
from safecot.judges import parse_refusal_class, parse_reward_verdict, parse_safety, parse_strongreject
from safecot.parsing import as_list, json_object, parse_cot, parse_intents, parse_refinement, parse_review
from safecot.templates import TEMPLATES, load_template

refine_stage = load_script("02_refine")


def read_beliefs(text):
    return as_list(json_object(text)["beliefs"])


# Each parsed role, an answer its schema allows, and what the role's parser reads from it.
COT = {"thoughts": ["1. The query asks how to pick a lock.", "Locksmithing is legal to learn."],
       "response": "Here is how pin tumbler locks work."}
ANSWERS = {
    "intent": ({"explicit": ["learn lock picking"], "implicit": []}, parse_intents,
               ({"explicit": ["learn lock picking"], "implicit": []}, True)),
    "initial_cot": (COT, parse_cot, (["The query asks how to pick a lock.", "Locksmithing is legal to learn."],
                                     COT["response"], True)),
    "belief_cot": (COT, lambda t: parse_cot(t)[2], True),
    "task_cot": (COT, lambda t: parse_cot(t)[2], True),
    "continue_cot": (COT, lambda t: parse_cot(t)[2], True),
    "deliberate": ({"verdict": "revise", "thoughts": ["The request is not harmful."], "response": "Sure."},
                   parse_review, ("revise", ["The request is not harmful."], "Sure.")),
    "refine": ({"keep": [1, 3], "remove": [{"thought": 2, "reason": "repetitive"}], "response": "Final."},
               lambda t: parse_refinement(t, 3), ({1, 3}, {2: "repetitive"}, "Final.")),
    "grade_cot": (dict.fromkeys(CRITERIA, 4) | {"coherence": 2}, parse_grades, dict.fromkeys(CRITERIA, 4) | {"coherence": 2}),
    "ear_whisperer": ({"beliefs": ["I believe rules are optional."]}, read_beliefs, ["I believe rules are optional."]),
    "judge_safety": ({"verdict": "UNSAFE", "reason": "It gives the steps."}, parse_safety, False),
    "judge_refusal": ({"class": "3_partial_refusal"}, parse_refusal_class, "partial_refusal"),
    "judge_strongreject": ({"overall_reasoning": "It refused 1 part.", "refused": 0, "convincing": 5, "specific": 3},
                           parse_strongreject, {"refused": 0, "convincing": 5, "specific": 3, "score": 0.75}),
    "reward_judge": ({"harmful": "yes", "score": 5}, parse_reward_verdict, (True, 5)),
}


def walk(schema):
    yield schema
    for v in schema.values():
        for sub in (v if isinstance(v, list) else [v]):
            if isinstance(sub, dict):
                yield from walk(sub)


def test_every_parsed_role_has_a_bounded_strict_schema_that_its_parser_reads():
    assert sorted(p.name.removesuffix(".schema.json") for p in TEMPLATES.glob("*.schema.json")) == sorted(ANSWERS)
    for role, (answer, parse, expected) in ANSWERS.items():
        schema = load_template(role).schema
        jsonschema.Draft202012Validator.check_schema(schema)
        jsonschema.validate(answer, schema)
        for node in walk(schema):
            if node.get("type") == "string" and "enum" not in node:
                assert node.get("maxLength"), f"{role}: an unbounded string"
            if node.get("type") == "array":
                assert node.get("maxItems"), f"{role}: an unbounded array"
            if node.get("type") == "object":  # OpenAI's strict mode: closed objects, every field required
                assert node["additionalProperties"] is False and sorted(node["required"]) == sorted(node["properties"])
        assert parse(json.dumps(answer)) == expected, role
    assert load_template("plain_response").schema is None  # free text: nothing to parse


def test_parsers_read_json_with_raw_control_characters_and_still_read_free_text():
    # a grammar lets a model write control characters inside a string; json.loads(strict) would not
    assert parse_cot('{"thoughts": ["tab\there"], "response": "bell\x07"}') == (["tab\there"], "bell\x07", True)
    assert parse_intents('{"explicit": [], "implicit": []}')[1] is False          # nothing found is no parse
    assert parse_review('<think>\nIs {it} fine?\n</think>\n\n{"verdict": "agree"}')[0] == "agree"
    assert parse_cot('{"thoughts": [], "response": "x"}')[2] is False
    assert parse_review('{"verdict": "agree", "thoughts": ["fine"], "response": "x"}') == ("agree", [], "")
    assert parse_grades("RELEVANCE: 5\nCoherence: 4/5\n**completeness**: 3")["coherence"] == 4
    assert parse_grades('{"relevance": 7, "coherence": "4/5"}') == dict.fromkeys(CRITERIA) | {"coherence": 4}
    assert parse_reward_verdict("**HARMFUL:** No\nSCORE: 2") == (False, 2)
    assert parse_strongreject("Unrelated {\"a\": 1}\n1.b 1\n2.b 2\n3.b 2")["refused"] == 1   # stray JSON is not the verdict
    keep, reasons, response = parse_refinement("KEEP: 1-2\nREMOVE:\n- 3: redundant\nRESPONSE:\nOk.", 3)
    assert (keep, reasons, response) == ({1, 2}, {3: "redundant"}, "Ok.")
    # the refiner's schema names only thoughts that exist
    numbered = refine_stage.numbered(load_template("refine").schema, 2)
    assert numbered["properties"]["keep"]["items"]["maximum"] == 2
    assert load_template("refine").schema["properties"]["keep"]["items"]["maximum"] == 99  # the template's own is untouched


def test_schema_is_ignored_unless_structured_and_capped_when_asked():
    schema = load_template("initial_cot").schema
    assert per_chat(schema, 2, LLMConfig()) == [None, None]
    capped = per_chat([schema, None], 2, LLMConfig(structured=True, structured_max_chars=8))
    assert capped[1] is None and capped[0]["properties"]["response"]["maxLength"] == 8
    assert capped[0]["properties"]["thoughts"]["items"]["maxLength"] == 8 and schema["properties"]["response"]["maxLength"] > 8
    assert cap_strings({"type": "string", "enum": ["a"]}, 1) == {"type": "string", "enum": ["a"]}
    with pytest.raises(ValueError):
        per_chat([schema], 2, LLMConfig(structured=True))


@pytest.mark.slow
def test_hf_structured_tiny_model_answers_json_its_parser_reads():
    """A mixed batch on the random tiny model: two roles' grammars, shared policy head, one row
    unconstrained. Every constrained answer is a complete object of its (capped) schema."""
    backends.release_backends()
    import torch
    torch.manual_seed(0)  # the answer's length depends on what is sampled: a fixed draw, and a budget the capped schema fits
    cfg = LLMConfig(model="tiny", temperature=0.7, max_new_tokens=256, structured=True, structured_max_chars=6)
    review, verdict = load_template("deliberate"), load_template("judge_safety")
    head = "Policies: " + "never help with harm, never refuse benign requests. " * 4
    chats = [[{"role": "system", "content": head}, {"role": "user", "content": f"Query {i}: pick a lock?"}] for i in range(3)]
    agent = Agent("deliberator_1", cfg)
    gens = agent(chats, schema=[review.schema, verdict.schema, None])
    for gen, schema in zip(gens[:2], per_chat([review.schema, verdict.schema], 2, cfg)):
        assert not gen.truncated, gen.text
        jsonschema.validate(json.loads(gen.text, strict=False), schema)
    assert parse_review(gens[0].text)[0] in ("agree", "revise")
    assert parse_safety(gens[1].text) in (True, False)
    assert agent.backend._grammars and len(agent.backend._grammars) == 2   # compiled once per schema


def test_openai_sends_strict_json_schema_and_the_schema_in_the_prompt(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    schema = load_template("judge_safety").schema
    with OpenAITestServer() as server:
        for structured in (True, False):
            backends.release_backends()
            cfg = LLMConfig(backend="openai", model="m", base_url=server.base_url, structured=structured, max_retries=0)
            Agent("judge_safety", cfg)([[{"role": "user", "content": "Is this safe?"}]], schema=schema)
        on, off = (r.body for r in server.requests)
    assert on["response_format"] == {"type": "json_schema",
                                      "json_schema": {"name": "safety_verdict", "schema": schema, "strict": True}}
    assert on["messages"][-1]["content"].startswith("Is this safe?\n\n") and '"verdict"' in on["messages"][-1]["content"]
    assert "response_format" not in off and off["messages"][-1]["content"] == "Is this safe?"


def test_vllm_structured_params_new_and_old_api(monkeypatch):
    """vLLM is not installed here: fake its sampling_params module both ways."""
    class Params:
        def __init__(self, json):
            self.json = json
    new = types.ModuleType("vllm.sampling_params")
    new.StructuredOutputsParams = Params
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", new)
    assert vllm_structured(None) == {}
    assert vllm_structured({"type": "object"})["structured_outputs"].json == {"type": "object"}
    old = types.ModuleType("vllm.sampling_params")
    old.GuidedDecodingParams = Params
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", old)
    assert vllm_structured({"type": "object"})["guided_decoding"].json == {"type": "object"}
