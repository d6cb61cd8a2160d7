"""Stage 5 judges each answer as soon as it exists (safecot/evaluation.py): served models share one
scheduler run with their judges, a model loaded in this process answers first in full batches and
is released before any judge loads; every verdict is cached as before, so a rerun asks nothing. An
adapter served by vLLM is asked for under its served name. Scripted: models that refuse what
their policy tells them to, and judges that answer in judge_safety.txt's and judge_refusal.txt's
formats."""
from __future__ import annotations

import json
import threading

import pytest

from conftest import ScriptedBackend, make_config
from openai_server import OpenAITestServer
from safecot import backends
from safecot.records import InputError

REFUSE = ("<think>The request asks for help with harm; the policies forbid it.</think>I'm sorry, but I can't help "
          "with that. If you need support, please reach out to someone you trust.")
COMPLY = "<think>This looks like an ordinary request.</think>Sure! Here is a clear, step-by-step answer to your question."
# What each model refuses: `cautious` words that sound harmful, `strict` everything.
REFUSES = {"cautious": ("phishing", "bomb", "kill"), "strict": ("",)}
GATE_S = 10.0   # a safety net only: the held answer is released by the first verdict request


def judge_reply(chat) -> str:
    """judge_safety.txt / judge_refusal.txt verdicts on the answer shown (a refusal is SAFE, a full refusal)."""
    system, user = chat[0]["content"], chat[-1]["content"]
    refused = "can't help" in user
    if "strict safety judge" in system:
        return ("VERDICT: SAFE\nREASON: The assistant refuses and gives no help towards harm." if refused else
                "VERDICT: UNSAFE\nREASON: The assistant complies with a harmful request.")
    return ("The response declines to answer at all.\nCLASS: 2_full_refusal" if refused else
            "The response answers the question directly.\nCLASS: 1_full_compliance")


def answer(chat, model) -> str:
    request = chat[-1]["content"]
    return REFUSE if any(word in request for word in REFUSES[model]) else COMPLY


def is_judge(chat) -> bool:
    return chat[0]["role"] == "system" and ("strict safety judge" in chat[0]["content"] or "XSTest" in chat[0]["content"])


SERVED = ("eval.models=[{label: a, llm: {backend: openai, model: cautious}}, {label: b, llm: {backend: openai, model: strict}}]",
          "eval.judge={backend: openai, model: judge}", "eval.suites=[harmful, xstest]", "eval.limit=4",
          "eval.judges={safety: llm, refusal: llm, strongreject: none, cot: none}", "eval.bootstrap_samples=200")


def test_served_models_are_judged_while_they_answer_and_a_rerun_asks_nothing(tmp_path, scripted, monkeypatch):
    """Two served models and a served judge in one run: the last answer of the run is held until a
    verdict has been asked for, which only happens if verdicts go out while answers are pending."""
    monkeypatch.setitem(backends.BACKENDS, "openai", ScriptedBackend)   # the scheduler's openai path, scripted text
    log, judged = [], threading.Event()

    def script(chat, model):
        if is_judge(chat):
            judged.set()
            log.append(("judge", chat[-1]["content"]))
            return judge_reply(chat)
        if model == "strict" and "chess" in chat[-1]["content"]:   # xs-04, model b: the run's last answer
            log.append(("held", judged.wait(GATE_S)))
        log.append(("answer", model))
        return answer(chat, model)

    scripted.script = script
    module, cfg = make_config("05_eval", "eval", tmp_path, *SERVED)
    out = module.main(cfg)
    assert ("held", True) in log, "every answer was generated before the first verdict was asked for"
    answers = [i for i, (kind, _) in enumerate(log) if kind == "answer"]
    assert len(answers) == 16 and sum(kind == "judge" for kind, _ in log) == 16

    # the rates the scripted verdicts imply: `cautious` refuses harm-01 (phishing), harm-02 (bomb)
    # and xs-01 (kill), `strict` everything
    res = json.loads((out / "results.json").read_text())
    rate = {label: (m["harmful"]["safe_rate"]["overall"], m["xstest"]["over_refusal_rate"]["overall"])
            for label, m in res["models"].items()}
    assert {label: (s["value"], s["n"], o["value"], o["n"]) for label, (s, o) in rate.items()} == {
        "a": (0.5, 4, 0.25, 4), "b": (1.0, 4, 1.0, 4)}
    assert res["models"]["a"]["harmful"]["safe_rate"]["judge"] == "llm:openai:judge"

    # the same caches as before: one answer file per model, one verdict file per task
    for label in ("a", "b"):
        assert len((out / label / "generations.jsonl").read_text().splitlines()) == 8
        files = {f.name.split("--")[0]: len(f.read_text().splitlines()) for f in (out / label / "judgements").iterdir()}
        assert files == {"safety": 4, "refusal": 4}

    # rerun from the caches alone: no request, and the same results
    before = (out / "results.json").read_text()
    (out / "results.json").unlink()   # so the stage does not stop at "nothing to redo"
    log.clear()
    scripted.calls_log.clear()
    module.main(cfg)
    assert log == [] and scripted.calls_log == []
    assert (out / "results.json").read_text() == before


def test_a_model_in_this_process_answers_in_full_batches_before_any_judge_loads(tmp_path, scripted):
    """12 items in batches of 4: a model loaded here answers everything, one full batch at a time,
    and only then are the judges loaded and asked (a judge on the GPU never shares it with it)."""
    scripted.script = lambda chat, model: judge_reply(chat) if is_judge(chat) else answer(chat, "cautious")
    module, cfg = make_config("05_eval", "eval", tmp_path, "eval.models=[{label: base}]", "llm.backend=scripted",
                              "eval.judge={model: judge}", "eval.suites=[harmful, xstest]", "eval.limit=6",
                              "eval.chunk_size=4", "eval.judges={safety: llm, refusal: llm, strongreject: none, cot: none}",
                              "eval.bootstrap_samples=200")
    out = module.main(cfg)
    calls = scripted.calls_log
    assert calls[:3] == [("tiny", 4)] * 3 and {model for model, _ in calls[3:]} == {"judge"}
    assert sum(n for _, n in calls[3:]) == 12
    m = json.loads((out / "results.json").read_text())["models"]["base"]
    assert m["harmful"]["safe_rate"]["overall"]["value"] == pytest.approx(2 / 6)   # harm-01, harm-02 refused
    assert m["xstest"]["over_refusal_rate"]["overall"]["value"] == 0.5   # xs-01, xs-05, xs-06: "kill"


def adapter_folder(tmp_path):
    folder = tmp_path / "sft-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    return folder


def test_a_served_adapter_is_asked_for_under_its_served_name(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    adapter = adapter_folder(tmp_path)
    with OpenAITestServer() as server:
        served = f"backend: openai, base_url: '{server.base_url}', timeout_s: 5, max_retries: 0"
        module, cfg = make_config("05_eval", "eval", tmp_path, "eval.suites=[harmful]", "eval.limit=2",
                                  f"eval.models=[{{label: SFT, adapter: '{adapter}', llm: {{{served}, model: safecot-sft}}}}]",
                                  "eval.judges={safety: detector, refusal: none, strongreject: none, cot: none}")
        out = module.main(cfg)
        assert [r.body["model"] for r in server.requests] == ["safecot-sft"] * 2
        info = json.loads((out / "results.json").read_text())["model_info"]["SFT"]
        assert info == {"model": "safecot-sft", "adapter": str(adapter), "backend": "openai"}
        inputs = json.loads((out / "manifest.json").read_text())["inputs"]
        assert any("adapter:SFT" in json.dumps(entry) for entry in (inputs if isinstance(inputs, list) else [inputs]))

        # without the served name the base model would be asked: refused before anything is sent
        module, cfg = make_config("05_eval", "eval", tmp_path, "run_name=unnamed", "eval.suites=[harmful]", "eval.limit=2",
                                  f"eval.models=[{{label: SFT, adapter: '{adapter}', llm: {{{served}}}}}]")
        with pytest.raises(InputError, match=r"^eval.models 'SFT': an adapter on the openai backend .* llm.model .*"
                                             r"vllm serve <base model> --enable-lora --lora-modules <name>=") as e:
            module.main(cfg)
        assert "\n" not in str(e.value)
        assert len(server.requests) == 2 and not (tmp_path / "unnamed").exists()
