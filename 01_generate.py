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

Every step is one batched backend call over all prompts still deliberating, not one call per
prompt. Prompts are taken in chunks; a finished chunk is on disk before the next starts, so a
kill loses at most the chunk in flight, and rerunning the same command carries on.

    python 01_generate.py --config configs/tiny.yaml
    python 01_generate.py --config configs/tiny.yaml run_name=try1 generate.limit=8
    python 01_generate.py --config configs/qwen2.5-7b.yaml generate.n_agents=2 --overwrite

Writes data/runs/<run_name>/01_generate/{records.jsonl, manifest.json}; one record per prompt:
id, prompt, label, category (and original_response, where the prompt set has one), intents,
thoughts, response, deliberation_log, rounds, turns, stop_reason, parse_failures.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from safecot.backends import Agent, LLMConfig
from safecot.config import run_cli
from safecot.prompt_sets import load_prompt_sources, prompt_sources
from safecot.records import InputError, Manifest, RecordWriter, batched, prepare_stage, stage_dir
from safecot.parsing import parse_cot, parse_intents, parse_review
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
    chunk_size: int = 64                # prompts deliberated together and saved together
    intent: dict = field(default_factory=dict)    # LLM overrides for the intent decomposer
    initial: dict = field(default_factory=dict)   # LLM overrides for the initial CoT writer
    deliberators: list = field(default_factory=list)  # per-agent overrides; agent k gets item k mod len


def numbered(lines: list[str]) -> str:
    return "\n".join(f"{i}. {t}" for i, t in enumerate(lines, 1)) or "(none)"


def intents_text(intents: dict) -> str:
    return (f"Explicit:\n{numbered(intents['explicit'])}\nImplicit:\n{numbered(intents['implicit'])}")


def log_turn(rec: dict, step: str, agent: Agent, gen, **extra) -> None:
    rec["deliberation_log"].append({"step": step, "agent": agent.role, "model": agent.label,
                                    "text": gen.text, "tokens": gen.tokens, "truncated": gen.truncated, **extra})


class Stats:
    """Counters and per-step timings for the manifest."""

    def __init__(self):
        self.counts = {"backend_errors": 0, "generated_tokens": 0, "backend_calls": 0}
        self.seconds: dict[str, float] = {}

    def call(self, step: str, agent: Agent, chats: list) -> list:
        t0 = time.perf_counter()
        gens = agent(chats)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0
        self.counts["backend_calls"] += 1
        self.counts["generated_tokens"] += sum(g.tokens for g in gens)
        return gens


def failed(rec: dict, gen, stats: Stats) -> bool:
    """A request that failed after its retries drops the record from this pass (it is not
    written, so the next run retries it)."""
    if gen.error:
        rec["error"] = gen.error
        stats.counts["backend_errors"] += 1
    return bool(gen.error)


def decompose_intents(agent, tpl, records, stats):
    gens = stats.call("intent", agent, [tpl.chat(prompt=r["prompt"]) for r in records])
    kept = []
    for rec, gen in zip(records, gens):
        if failed(rec, gen, stats):
            continue
        rec["intents"], ok = parse_intents(gen.text)
        if gen.truncated:  # a list cut off at the budget may have lost intents: not a result
            rec["intents"], ok = {"explicit": [], "implicit": []}, False
        log_turn(rec, "intent", agent, gen, parsed=ok)
        if not ok:
            rec["parse_failures"].append("intent")
        kept.append(rec)
    return kept


def initial_cot(agent, tpl, records, policies, stats):
    chats = [tpl.chat(prompt=r["prompt"], policies=policies, intents=intents_text(r["intents"])) for r in records]
    gens = stats.call("initial", agent, chats)
    kept = []
    for rec, gen in zip(records, gens):
        if failed(rec, gen, stats):
            continue
        rec["thoughts"], rec["response"], ok = parse_cot(gen.text)
        if gen.truncated:  # an unfinished CoT or response: the deliberators start from nothing
            rec["thoughts"], rec["response"], ok = [], "", False
        elif not ok:  # keep what was there: the raw text stands as the response until an agent revises it
            rec["response"] = rec["response"] or gen.text
        if not ok:
            rec["parse_failures"].append("initial")
        log_turn(rec, "initial", agent, gen, parsed=ok)
        kept.append(rec)
    return kept


def deliberate(agents, tpl, records, policies, max_rounds, stats):
    """Turns over the prompts still deliberating; returns those that finished."""
    active, done = list(records), []
    for rnd in range(1, max_rounds + 1):
        for k, agent in enumerate(agents, 1):
            if not active:
                return done
            chats = [tpl.chat(prompt=r["prompt"], policies=policies, intents=intents_text(r["intents"]),
                              thoughts=numbered(r["thoughts"]), response=r["response"] or "(none)",
                              agent=k, n_agents=len(agents), round=rnd) for r in active]
            gens = stats.call("deliberation", agent, chats)
            still = []
            for rec, gen in zip(active, gens):
                if failed(rec, gen, stats):
                    continue
                verdict, thoughts, response = parse_review(gen.text)
                if gen.truncated:  # cut off at the budget: unread, however well its start parses
                    verdict = "unparsed"
                log_turn(rec, "deliberation", agent, gen, round=rnd, verdict=verdict)
                rec["rounds"], rec["turns"] = rnd, rec["turns"] + 1
                if verdict == "agree":
                    rec["stop_reason"] = "agreement"
                    done.append(rec)
                    continue
                if verdict == "revise":
                    rec["thoughts"], rec["response"] = thoughts, response or rec["response"]
                else:  # an unreadable turn changes nothing; the next agent reviews the same thoughts
                    rec["parse_failures"].append("deliberation")
                still.append(rec)
            active = still
    for rec in active:
        rec["stop_reason"] = "budget"
    return done + active


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


def main(cfg: Config, overwrite: bool = False):
    if cfg.n_agents < 1 or cfg.max_rounds < 0:
        raise InputError("generate.n_agents must be >= 1 and generate.max_rounds >= 0")
    # Role configs are checked before anything is written, so a bad one costs nothing.
    roles = {"intent_decomposer": cfg.llm.merged(cfg.intent), "initial_cot": cfg.llm.merged(cfg.initial)}
    for k in range(cfg.n_agents):
        roles[f"agent_{k + 1}"] = cfg.llm.merged(cfg.deliberators[k % len(cfg.deliberators)] if cfg.deliberators else None)
    out = prepare_stage(stage_dir(cfg, "01_generate"), overwrite)
    sources = prompt_sources(cfg.prompts, cfg.prompt_split, cfg.prompt_subset, cfg.prompt_columns, cfg.prompt_defaults,
                             cfg.prompt_values)
    prompts = load_prompt_sources(sources, cfg.limit)
    policy_set = load_policies(cfg.policies)
    policies = policy_set.text()
    tpl = {n: load_template(n, cfg.templates) for n in ("intent", "initial_cot", "deliberate")}
    manifest = Manifest(out, "01_generate", asdict(cfg), resume_ignores=("limit", "chunk_size"))
    for i, src in enumerate(sources):
        hub = {"split": src["split"], "subset": src["subset"]} if src["source"].startswith("hf:") else {}
        manifest.input("prompts" if len(sources) == 1 else f"prompts[{i}]", src["source"], src["rows"], **hub)
    manifest.input("policies", cfg.policies, len(policy_set.policies))
    for name in tpl:
        manifest.input(f"template {name}", Path(cfg.templates) / f"{name}.txt")

    import transformers
    transformers.set_seed(cfg.seed)
    intent_agent, initial_agent, *deliberators = (Agent(role, llm) for role, llm in roles.items())

    stats = Stats()
    writer = RecordWriter(out / "records.jsonl")
    writer.check_inputs(prompts, ("prompt", "original_response"))
    todo = [p for p in prompts if p["id"] not in writer.done]
    if writer.done:
        print(f"resuming: {len(writer.done)} records already written, {len(todo)} to go")
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="01_generate", unit="prompt")
    with writer:
        for chunk in batched(todo, cfg.chunk_size):
            records = [{**p, "intents": {}, "thoughts": [], "response": "", "deliberation_log": [],
                        "rounds": 0, "turns": 0, "stop_reason": None, "parse_failures": []} for p in chunk]
            bar.set_postfix_str("intents")
            records = decompose_intents(intent_agent, tpl["intent"], records, stats)
            bar.set_postfix_str("initial CoT")
            records = initial_cot(initial_agent, tpl["initial_cot"], records, policies, stats)
            bar.set_postfix_str("deliberation")
            for rec in deliberate(deliberators, tpl["deliberate"], records, policies, cfg.max_rounds, stats):
                writer.write(rec)
            bar.update(len(chunk))
        bar.close()
        written = list(writer.done.values())

    manifest.output("records", out / "records.jsonl")
    manifest.data["timings"]["step_s"] = {k: round(v, 3) for k, v in stats.seconds.items()}
    missing = sum(1 for p in prompts if p["id"] not in writer.done)
    manifest.finish(prompts=len(prompts), missing=missing, **summarise(written), this_session=stats.counts)
    if missing:
        manifest.data["status"] = "partial"
        manifest.save()
        print(f"warning: {missing} prompts failed on the backend; rerun the same command to retry them")
    return out


if __name__ == "__main__":
    run_cli("generate", Config, main, __doc__)
