"""Stage 1: policy-embedded chain-of-thought data by agentic deliberation (AIDSAFE).

For every prompt, as in Kumarage et al. 2025 (arXiv 2505.21784), section 3:
  1. Intent decomposition: an agent lists the prompt's explicit and implicit intents.
  2. Initial CoT: an agent writes a first chain of thought and response from the prompt, the
     policies and the intents.
  3. Deliberation: N agents take turns reviewing the current thoughts against the policies; each
     either agrees (deliberation stops) or corrects/extends the thoughts and updates the response.
     The round budget ends it otherwise.
The refiner (stage 2) then cleans the thoughts of every round.

A generation that stopped at its token budget (`max_new_tokens`, reported by the backend as
`truncated`) is unfinished: it counts as a parse failure of its step, even when what came through
parses (a revision cut off mid-sentence may read as a complete one), so it never becomes the
intents, the initial CoT or a revision. Such turns are counted in the manifest (`truncated_turns`).

Each prompt's method is one generator, `aidsafe` below, that reads as the steps above; the
scheduler (safecot/scheduler.py) runs `chunk_size` of them at once with no barrier between steps:
on an `openai` backend each request goes out as soon as its prompt is ready (up to
`llm.max_concurrency` in flight), and on `hf`/`vllm` each tick batches every pending request of a
model and step, from all prompts, into one call. A prompt that finishes (agreement, or the budget)
is written at once and the next is admitted, so a kill loses at most the prompts in flight, and
rerunning the same command carries on. The stage folder is locked while a process writes it
(safecot/stage.py), so a second process on the same run stops instead of writing records twice.

    python 01_generate.py --config configs/tiny.yaml
    python 01_generate.py --config configs/tiny.yaml run_name=try1 generate.limit=8
    python 01_generate.py --config configs/qwen2.5-7b.yaml generate.n_agents=2 --overwrite

Writes data/runs/<run_name>/01_generate/{records.jsonl, manifest.json}; one record per prompt:
id, prompt, label, category, categories (and original_response, original_responses, where the prompt
set has them), intents,
thoughts, response, deliberation_log, rounds, turns, stop_reason, parse_failures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from safecot import scheduler
from safecot.backends import Agent, LLMConfig
from safecot.prompt_sets import load_prompt_sources, prompt_sources
from safecot.records import InputError, Manifest, RecordWriter
from safecot.parsing import intents_text, numbered, parse_cot, parse_intents, parse_review
from safecot.scheduler import Request
from safecot.stage import open_stage, run_cli, seed_agents
from safecot.templates import load_policies, load_template


@dataclass
class Config:
    run_name: str = "tiny"              # outputs go to <runs_dir>/<run_name>/01_generate/
    seed: int = 0
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # every agent's LLM unless a role overrides it
    prompts: str | list = "data/prompts/seed.jsonl"  # .jsonl, .csv, hf:<dataset id>, or a list of sources to mix
    prompt_split: str = "train"         # Hub datasets only
    prompt_subset: str | None = None    # Hub datasets only: the config name
    prompt_columns: dict = field(default_factory=dict)   # {our_field: their_column}
    prompt_defaults: dict = field(default_factory=dict)  # {our_field: value} for missing columns
    prompt_values: dict = field(default_factory=dict)    # {our_field: {their_value: our_value}}, e.g. {label: {false: harmful}}
    limit: int | None = None            # take the first N prompts
    policies: str = "data/policies/detailed.yaml"  # or data/policies/cases.yaml (CADA style)
    templates: str = "data/templates"   # intent.txt, initial_cot.txt, deliberate.txt
    n_agents: int = 3                   # deliberating agents (the paper used two)
    max_rounds: int = 3                 # deliberation budget: rounds of N turns (not published)
    chunk_size: int = 64                # records in flight at once (openai: at least 2 x llm.max_concurrency)
    intent: dict = field(default_factory=dict)    # LLM overrides for the intent decomposer
    initial: dict = field(default_factory=dict)   # LLM overrides for the initial CoT writer
    deliberators: list = field(default_factory=list)  # per-agent overrides; agent k gets item k mod len


def log_turn(rec: dict, step: str, agent: Agent, gen, **extra) -> None:
    rec["deliberation_log"].append({"step": step, "agent": agent.role, "model": agent.label,
                                    "text": gen.text, "tokens": gen.tokens, "truncated": gen.truncated, **extra})


def failed(rec: dict, gen, counts: dict) -> bool:
    """A request that failed after its retries drops the record from this pass (it is not
    written, so the next run retries it)."""
    if gen.error:
        rec["error"] = gen.error
        counts["backend_errors"] += 1
    return bool(gen.error)


def aidsafe(rec: dict, intent_agent: Agent, initial_agent: Agent, deliberators: list[Agent], tpl: dict,
            policies: str, max_rounds: int, counts: dict):
    """One prompt through AIDSAFE. A generator: each `yield Request(...)` is one agent turn, whose
    Generation comes back from the scheduler. Returns the record, or None when a request failed."""
    # 1. Intent decomposition.
    gen = yield Request(intent_agent, tpl["intent"].chat(prompt=rec["prompt"]), tpl["intent"].schema, "intent")
    if failed(rec, gen, counts):
        return None
    rec["intents"], ok = parse_intents(gen.text)
    if gen.truncated:  # a list cut off at the budget may have lost intents: not a result
        rec["intents"], ok = {"explicit": [], "implicit": []}, False
    log_turn(rec, "intent", intent_agent, gen, parsed=ok)
    if not ok:
        rec["parse_failures"].append("intent")

    # 2. Initial CoT from the prompt, the policies and the intents.
    intents = intents_text(rec["intents"])
    chat = tpl["initial_cot"].chat(prompt=rec["prompt"], policies=policies, intents=intents)
    gen = yield Request(initial_agent, chat, tpl["initial_cot"].schema, "initial")
    if failed(rec, gen, counts):
        return None
    rec["thoughts"], rec["response"], ok = parse_cot(gen.text)
    if gen.truncated:  # an unfinished CoT or response: the deliberators start from nothing
        rec["thoughts"], rec["response"], ok = [], "", False
    elif not ok:  # keep what was there: the raw text stands as the response until an agent revises it
        rec["response"] = rec["response"] or gen.text
    if not ok:
        rec["parse_failures"].append("initial")
    log_turn(rec, "initial", initial_agent, gen, parsed=ok)

    # 3. Deliberation: agents take turns until one agrees or the round budget is spent.
    for rnd in range(1, max_rounds + 1):
        for k, agent in enumerate(deliberators, 1):
            chat = tpl["deliberate"].chat(prompt=rec["prompt"], policies=policies, intents=intents,
                                          thoughts=numbered(rec["thoughts"]), response=rec["response"] or "(none)",
                                          agent=k, n_agents=len(deliberators), round=rnd)
            gen = yield Request(agent, chat, tpl["deliberate"].schema, "deliberation")
            if failed(rec, gen, counts):
                return None
            verdict, thoughts, response = parse_review(gen.text)
            if gen.truncated:  # cut off at the budget: unread, however well its start parses
                verdict = "unparsed"
            log_turn(rec, "deliberation", agent, gen, round=rnd, verdict=verdict)
            rec["rounds"], rec["turns"] = rnd, rec["turns"] + 1
            if verdict == "agree":
                rec["stop_reason"] = "agreement"
                return rec
            if verdict == "revise":
                rec["thoughts"], rec["response"] = thoughts, response or rec["response"]
            else:  # an unreadable turn changes nothing; the next agent reviews the same thoughts
                rec["parse_failures"].append("deliberation")
    rec["stop_reason"] = "budget"
    return rec


def summarise(records: list[dict]) -> dict:
    """Counts over every record on disk (this session's and earlier ones')."""
    stop, failures = {}, {"intent": 0, "initial": 0, "deliberation": 0}
    truncated = dict(failures)
    for rec in records:
        stop[rec["stop_reason"]] = stop.get(rec["stop_reason"], 0) + 1
        for step in rec["parse_failures"]:
            failures[step] += 1
        for turn in rec["deliberation_log"]:
            truncated[turn["step"]] += bool(turn.get("truncated"))
    return {"records": len(records), "stop_reasons": stop, "parse_failures": failures,
            "truncated_turns": truncated, "turns": sum(r["turns"] for r in records)}


def role_configs(cfg: Config) -> dict:
    """Each agent role's LLM settings, checked before anything is written, so a bad one costs nothing."""
    roles = {"intent_decomposer": cfg.llm.merged(cfg.intent), "initial_cot": cfg.llm.merged(cfg.initial)}
    for k in range(cfg.n_agents):
        roles[f"agent_{k + 1}"] = cfg.llm.merged(cfg.deliberators[k % len(cfg.deliberators)] if cfg.deliberators else None)
    return roles


def record_inputs(manifest: Manifest, cfg: Config, sources: list, policy_set, templates: dict) -> None:
    for i, src in enumerate(sources):
        hub = {"split": src["split"], "subset": src["subset"]} if src["source"].startswith("hf:") else {}
        manifest.input("prompts" if len(sources) == 1 else f"prompts[{i}]", src["source"], src["rows"], **hub)
    manifest.input("policies", cfg.policies, len(policy_set.policies))
    for name, tpl in templates.items():
        manifest.input(f"template {name}", Path(cfg.templates) / f"{name}.txt")
        if tpl.schema is not None:  # constrains the answer when llm.structured is on
            manifest.input(f"schema {name}", Path(cfg.templates) / f"{name}.schema.json")


def main(cfg: Config, overwrite: bool = False):
    if cfg.n_agents < 1 or cfg.max_rounds < 0:
        raise InputError("generate.n_agents must be >= 1 and generate.max_rounds >= 0")
    roles = role_configs(cfg)
    sources = prompt_sources(cfg.prompts, cfg.prompt_split, cfg.prompt_subset, cfg.prompt_columns, cfg.prompt_defaults,
                             cfg.prompt_values)
    prompts = load_prompt_sources(sources, cfg.limit)
    policy_set = load_policies(cfg.policies)
    tpl = {n: load_template(n, cfg.templates) for n in ("intent", "initial_cot", "deliberate")}

    with open_stage(cfg, "01_generate", overwrite, resume_ignores=("limit", "chunk_size"), seed=False) as st:
        record_inputs(st.manifest, cfg, sources, policy_set, tpl)
        writer = RecordWriter(st.out / "records.jsonl")  # refuses a record edited by hand, naming its line
        writer.check_inputs(prompts, ("prompt", "label", "original_response", "original_responses"))
        if st.unchanged():  # finished before with this config and these inputs: nothing to redo or rewrite
            writer.close()
            return st.out
        intent_agent, initial_agent, *deliberators = agents = [Agent(role, llm) for role, llm in roles.items()]
        seed_agents(cfg.seed, agents)
        todo = [p for p in prompts if p["id"] not in writer.done]
        if writer.done:
            print(f"resuming: {len(writer.done)} records already written, {len(todo)} to go")

        # Every prompt's method at once, `chunk_size` in flight; each record is written as it finishes.
        counts, policies = {"backend_errors": 0}, policy_set.text()
        fresh = ({**p, "intents": {}, "thoughts": [], "response": "", "deliberation_log": [], "rounds": 0, "turns": 0,
                  "stop_reason": None, "parse_failures": []} for p in todo)

        def method(rec):
            return aidsafe(rec, intent_agent, initial_agent, deliberators, tpl, policies, cfg.max_rounds, counts)

        def save(rec: dict | None) -> bool:
            # None: a request failed; the prompt is left for the next run (the bar counts it as failed)
            return rec is not None and writer.write(rec) is not False

        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="01_generate", unit="prompt")
        with writer:
            usage = scheduler.run(fresh, method, save, scheduler.pool_size(cfg.chunk_size, agents), bar)
        bar.close()

        st.manifest.output("records", st.out / "records.jsonl")
        st.manifest.data["timings"]["step_s"] = {k: round(v, 3) for k, v in usage.seconds.items()}
        missing = sum(1 for p in prompts if p["id"] not in writer.done)
        session = {**counts, "generated_tokens": usage.generated_tokens, "backend_calls": usage.backend_calls}
        st.finish(missing=missing, what="prompts", prompts=len(prompts), **summarise(list(writer.done.values())),
                  this_session=session, failures=usage.failures)
    return st.out


if __name__ == "__main__":
    run_cli("generate", Config, main, __doc__)
