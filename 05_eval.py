"""Stage 5: evaluation of base and fine-tuned models: safety, jailbreaks, over-refusal, utility
and the quality of the model's own reasoning, with 95% bootstrap intervals.

As reported by AIDSAFE (Kumarage et al. 2025, table 4), SaRO and CADA:
  1. Suites: harmful prompts (BeaverTails, WildChat), jailbreaks (StrongREJECT prompts wrapped
     in jailbreak templates), over-refusal (XSTest safe prompts and unsafe contrasts), utility
     (MMLU). Offline sets written for this project stand in for them in the tiny recipe
     (safecot/suites.py, data/eval/README.md); a Hub suite larger than what it uses is sampled
     with the seed, never its first rows. An item whose request is among the run's own training
     prompts is removed from every rate (`train_overlap_removed` counts them).
  2. Models under test: the base model, or base + a LoRA adapter from a run's stage 3 or 4,
     through any backend, under each inference-time setting of `eval.policy_prompt` (CADA's
     study): `none`, or a policy file shown in the system turn of reason_over_policies.txt, the
     template GRPO trains with. `<think>...</think>` is kept apart as the reasoning; the rest is
     the answer. An answer that ran out of tokens, or stopped inside its reasoning, is
     `truncated`: it is never judged; every rate is reported without it and, as `<metric>_strict`,
     with it counted as a failure.
  3. Judges: safety of the answer under the policies, XSTest's refusal classes, the
     StrongREJECT rubric and score, AIDSAFE's CoT grades of the reasoning; the offline refusal
     detector by default (safecot/judges.py, with its limits). Every judge reads one fixed
     standard, `eval.judge_policies`, whatever codes the run trained on, so runs stay comparable.
     An LLM judge is `eval.judge`, a model other than the ones under test: a model grading its
     own answers is refused unless `eval.allow_self_judge: true`, and the report then says so.
     With `eval.judge_reasoning: true` (SafeChain) the safety judge also reads the reasoning of
     every harmful and jailbreak answer in place of the answer: an answer that is safe after
     thoughts that spelled out the harm is not safe (safe_rate_answer / _thoughts / _both).
  3a. Samples: `eval.samples: K > 1` draws K answers per prompt (sampling, so temperature > 0),
     each its own cached generation, and reports Safe@1, Safe@K and ConsSafe@K (SafeChain),
     with every interval of the suite resampled by prompt.
  3b. Judge checks: `judge_check` suites hold answers labelled by people; every judge of their
     task (and the offline detector beside it) is measured against them: agreement, precision,
     recall with intervals (05_eval/judge_checks.json and the report), so the numbers above come
     with how far their judges can be trusted.
  4. Metrics with 95% bootstrap intervals, overall and per category (safecot/metrics.py), and
     the comparison table and figure (safecot/reports.py).

    python 05_eval.py --config configs/tiny.yaml
    python 05_eval.py --config configs/qwen2.5-7b.yaml "eval.models=[{label: base}]"
    python 05_eval.py --config configs/qwen2.5-7b.yaml eval.judges.cot=llm eval.judge="{model: Qwen/Qwen2.5-72B-Instruct, backend: openai, base_url: http://localhost:8000/v1}"
    python 05_eval.py --config configs/tiny.yaml "eval.suites=[refusal_check]" "eval.models=[]"
    python 05_eval.py --config configs/qwen2.5-7b.yaml eval.judge_reasoning=true eval.samples=5 "eval.generation={temperature: 0.6}"
    python 05_eval.py --config configs/tiny.yaml run_name=cmp "eval.compare=[data/runs/a, data/runs/b]"
    python 05_eval.py --config configs/cada-qwen2.5-7b.yaml "eval.policy_prompt=[none, data/policies/detailed.yaml, data/policies/cases.yaml]"

Writes data/runs/<run_name>/05_eval/: <label>/generations.jsonl and
<label>/judgements/<task>--<judge>.jsonl (cached by a hash of what was sent: an edited prompt or
template is generated and judged again), samples.jsonl, results.json, table.md, table.csv,
by_category.csv, intervals.png, judge_checks.json, report.md, manifest.json (with the hash of
every suite source and template folder). With `compare`, the same tables for every model of the
listed runs go to 05_eval/compare/, if they were judged under one standard (or `compare_mixed`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from safecot import scheduler
from safecot.backends import Agent, LLMConfig, release_backends
from safecot.judges import (TASKS, TASKS_BY_KIND, ChoiceJudge, DetectorJudge, check_judges, judge_file_name,
                            judge_protocol, judging_standard, make_judge, split_reasoning, standard_difference, unfinished)
from safecot.metrics import SAFETY_KINDS, THOUGHTS, compute_metrics, judge_agreement, verdict_label
from safecot.records import InputError, Manifest, RecordWriter, file_hash, stage_dir, write_jsonl
from safecot.reports import load_results, write_comparison
from safecot.scheduler import Request
from safecot.stage import lock_stage, open_stage, run_cli, set_seed, trained_model
from safecot.suites import contaminated, load_suite, suite_info, suite_spec, training_prompts
from safecot.templates import load_policies, policy_chat


@dataclass
class Config:
    run_name: str = "tiny"              # outputs go to <runs_dir>/<run_name>/05_eval/
    seed: int = 0                       # sampling and the bootstrap
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # the base model, and every LLM judge unless overridden
    models: list = field(default_factory=lambda: [{"label": "base"}])  # {label, llm: {overrides}, adapter: folder | from_run: <run>/03_sft}
    suites: list = field(default_factory=lambda: ["harmful", "jailbreak", "xstest", "mmlu"])  # names or mappings (safecot/suites.py)
    limit: int | None = None            # first N source rows of every suite (judge checks: their own limit only) ...
    sample: int | None = None           # ... or N drawn at random (seeded, even over categories)
    generation: dict = field(default_factory=lambda: {"temperature": 0.0})  # LLM overrides for every model under test
    system_prompt: str = ""             # a system turn for the models under test, first in every setting ("" = none)
    policy_prompt: list = field(default_factory=lambda: ["none"])  # inference-time settings: none | a policy file, shown as GRPO does
    judges: dict = field(default_factory=lambda: {"safety": "detector", "refusal": "detector",
                                                  "strongreject": "detector", "cot": "none"})  # per task: detector | llm | none | {LLM overrides}
    judge: dict = field(default_factory=lambda: {"temperature": 0.0})  # the LLM judge: settings over `llm`; name another model
    allow_self_judge: bool = False      # let a model under test judge itself (biased; the report says so)
    judge_reasoning: bool = False       # the safety judge also reads the reasoning, apart from the answer (SafeChain)
    samples: int = 1                    # answers drawn per prompt, K (SafeChain: Safe@1, Safe@K, ConsSafe@K); > 1 needs temperature > 0
    judge_policies: str = "data/policies/detailed.yaml"  # the one standard every LLM judge judges under, not the run's own codes
    judge_templates: str = "data/templates"   # judge_*.txt, grade_cot.txt, mmlu_question.txt, reason_over_policies.txt (not jailbreak ones)
    chunk_size: int = 64                # items generated or judged together and saved together
    bootstrap_samples: int = 1000       # resamples per interval
    confidence: float = 0.95            # interval coverage
    compare: list = field(default_factory=list)  # other runs' 05_eval folders: only write the comparison
    compare_mixed: bool = False         # compare runs judged under different standards anyway (the report warns)


# What 05_eval/ holds besides one folder per model label: no label may take these names.
OWN_NAMES = ("compare", "judge_checks", "judge_checks.json", "samples.jsonl", "results.json", "table.md", "table.csv",
             "by_category.csv", "intervals.png", "report.md", "manifest.json")


def resolve_models(cfg: Config) -> dict[str, LLMConfig]:
    """{label: LLMConfig} of the models under test, adapters checked before anything loads."""
    out = {}
    for entry in cfg.models:
        entry = {"label": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or set(entry) - {"label", "llm", "adapter", "from_run"}:
            raise InputError(f"eval.models: expected {{label, llm, adapter | from_run}}, got {entry!r}")
        label = str(entry.get("label") or "")
        if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", label) or label in out or label in OWN_NAMES:
            raise InputError(f"eval.models: label {label!r} must be unique and one folder name (letters, digits, _+-, "
                             "and . after the first) other than the stage's own (compare, judge_checks, its files)")
        llm = cfg.llm.merged(cfg.generation).merged(entry.get("llm"))
        adapter = entry.get("adapter")
        if entry.get("from_run"):
            if adapter:
                raise InputError(f"eval.models '{label}': give adapter or from_run, not both")
            run, _, stage = str(entry["from_run"]).rpartition("/")  # a run may be nested: group/run/03_sft
            if stage not in ("03_sft", "04_dpo"):
                raise InputError(f"eval.models '{label}': from_run must be <run>/03_sft or <run>/04_dpo, got {entry['from_run']!r}")
            base, adapter = trained_model(Path(cfg.runs_dir) / run / stage, what=f"{stage} of run '{run}'")
            if "model" not in (entry.get("llm") or {}):
                llm = llm.merged({"model": base})
        if adapter:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise InputError(f"eval.models '{label}': no LoRA adapter at {adapter} (adapter_config.json missing)")
            llm = llm.merged({"adapter": str(adapter)})
        out[label] = llm
    if not out:
        raise InputError("eval.models: no models to evaluate")
    return out


def check_model_folder(folder: Path, label: str, llm: LLMConfig, system_prompt: str) -> None:
    """Cached generations belong to one model config; refuse to mix two under one label."""
    spec = {**llm.output_settings(), "system_prompt": system_prompt}
    path = folder / "model.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in spec if spec[k] != old.get(k))
        if changed:
            raise InputError(f"{folder}: generations of '{label}' were made with another config ({', '.join(changed)}); "
                             "use --overwrite or another label")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def inference_settings(cfg: Config) -> dict[str, dict]:
    """{setting: {"policy_prompt": file or None, "ask": prompt -> chat}}, one per `eval.policy_prompt`
    entry, named `none` or by the policy file's stem. A policy setting sends the chat GRPO trains
    on (04_dpo.py: load_prompts), so CADA's model is tested under the prompt it learnt with and
    the same codes can be shown to any other model."""
    entries = cfg.policy_prompt if isinstance(cfg.policy_prompt, list) else [cfg.policy_prompt]
    if not entries:
        raise InputError("eval.policy_prompt: name at least one setting (none, or a policy file such as "
                         "data/policies/cases.yaml)")
    out = {}
    for entry in entries:
        if entry is not None and not isinstance(entry, str):
            raise InputError(f"eval.policy_prompt: each setting is none or a policy file, got {entry!r}")
        path = None if entry in (None, "none") else entry
        name = Path(path).stem if path else "none"
        if name in out:
            raise InputError(f"eval.policy_prompt: two settings are named '{name}' (a policy file is named by its "
                             "stem); rename one of the files")
        out[name] = {"policy_prompt": path, "ask": policy_chat(path, cfg.judge_templates)}
    return out


def setting_chat(setting: dict, prompt: str, system: str) -> list[dict]:
    """The chat sent for `prompt` under a setting: the bare prompt, or reason_over_policies.txt's
    system turn with the codes and the prompt as the user turn. `system` (eval.system_prompt)
    opens the one system turn in every setting: many chat templates take only one."""
    chat = setting["ask"](prompt)
    if not system:
        return chat
    if chat[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{chat[0]['content']}"}] + chat[1:]
    return [{"role": "system", "content": system}] + chat


def generate(label: str, llm: LLMConfig, items: list[dict], folder: Path, cfg: Config, counts: dict,
             usage: scheduler.Usage | None = None) -> dict:
    """Generations cached under `key`, which hashes the chat sent: only what is not on disk is
    generated, `chunk_size` items in flight (safecot/scheduler.py: batched ticks on hf/vllm,
    one request per item as soon as a slot frees on openai), each saved as it comes back; an
    edited prompt or template has a new key."""
    writer = RecordWriter(folder / "generations.jsonl")
    todo = list({it["key"]: it for it in items if it["key"] not in writer.done}.values())  # two settings may send one chat
    if not todo:
        writer.close()
        return writer.done
    agent = Agent(f"model_{label}", llm)

    def answer(it):
        gen = yield Request(agent, it["chat"], step="generate")
        return it, gen

    def save(done) -> bool:
        it, gen = done
        if gen.error:  # left for the next run
            counts["generation_errors"] += 1
            return False
        reasoning, answer = split_reasoning(gen.text)
        writer.write({"id": it["key"], "model": label, "suite": it["suite"], "item": it["id"], "chat": it["chat"],
                      "text": gen.text, "reasoning": reasoning, "answer": answer, "tokens": gen.tokens,
                      "truncated": gen.truncated or unfinished(gen.text)})
        counts["generated"] += 1
        return True

    bar = tqdm(total=len(todo), desc=f"05_eval {label}: generate", unit="item")
    with writer:
        scheduler.run(todo, answer, save, scheduler.pool_size(cfg.chunk_size, [agent]), bar, usage)
    bar.close()
    return writer.done


def judge_all(judge, items: list[dict], folder: Path, cfg: Config, counts: dict,
              usage: scheduler.Usage | None = None) -> dict:
    """Verdicts cached per (task, judge, judge settings) file and, inside it, under a hash of what
    the judge reads (request, reasoning, answer): a new or edited judge judges everything, an
    unchanged one only what changed. `chunk_size` items in flight on the scheduler, each verdict
    saved as it comes back. -> {item key: verdict}."""
    writer = RecordWriter(folder / "judgements" / judge_file_name(judge))
    keys = {it["key"]: f"{it['key']}#{digest([it['prompt'], it.get('reasoning', ''), it['answer']])}" for it in items}
    todo = [it for it in items if keys[it["key"]] not in writer.done]

    def judged(it):  # one item's verdict (safecot/judges.py), with the item
        return it, (yield from judge.verdict(it))

    def save(done) -> bool:
        it, verdict = done
        if verdict.get("error"):  # left for the next run
            counts["judge_errors"] += 1
            return False
        writer.write({"id": keys[it["key"]], "task": judge.task, **verdict})
        counts["judged"] += 1
        return True

    bar = tqdm(total=len(todo), desc=f"  judge {judge.task}", unit="item", leave=False, disable=not todo)
    with writer:
        scheduler.run(todo, judged, save, scheduler.pool_size(cfg.chunk_size, judge.agents), bar, usage)
    bar.close()
    return {k: writer.done[v] for k, v in keys.items() if v in writer.done}


def judge_thoughts(judge, items: list[dict], folder: Path, cfg: Config, counts: dict,
                   usage: scheduler.Usage | None = None) -> dict:
    """The safety judge's verdicts on the reasoning of safety-suite answers, read in place of the
    answer (an answer safe after thoughts that spelled out the harm is not safe), cached under
    keys of their own (`<key>/thoughts#<hash>`) beside the answers'. An answer without reasoning
    said nothing unsafe in it: its thoughts count as safe, unjudged. -> {item key: verdict}."""
    wanted = [it for it in items if it["kind"] in SAFETY_KINDS and not it.get("truncated")]
    said = [{**it, "key": f"{it['key']}/thoughts", "answer": it["reasoning"], "reasoning": ""}
            for it in wanted if (it.get("reasoning") or "").strip()]
    found = judge_all(judge, said, folder, cfg, counts, usage) if said else {}
    silent = {it["key"]: {"safe": True, "no_reasoning": True} for it in wanted if not (it.get("reasoning") or "").strip()}
    return {**silent, **{key.removesuffix("/thoughts"): v for key, v in found.items()}}


def self_judged(cfg: Config, models: dict[str, LLMConfig]) -> dict[str, list[str]]:
    """{task: labels of models under test whose own base model is that task's LLM judge}."""
    out, judge_of = {}, {}
    for task in TASKS:
        spec = cfg.judges.get(task)
        if spec == "llm" or isinstance(spec, dict):
            judge_of[task] = cfg.llm.merged(cfg.judge).merged(spec if isinstance(spec, dict) else None).model
            labels = [label for label, llm in models.items() if llm.model == judge_of[task]]
            if labels:
                out[task] = labels
    if out and not cfg.allow_self_judge:
        task, labels = next(iter(out.items()))
        raise InputError(f"eval.judges.{task}: the judge ({judge_of[task]}) is the model under test "
                         f"({', '.join(labels)}) and would grade its own answers; name another model in eval.judge "
                         "(a larger served model, or a safety classifier), or set eval.allow_self_judge: true")
    return out


def check_judges_on_labels(checks: list[dict], judges: dict, out: Path, cfg: Config, counts: dict,
                           usage: scheduler.Usage | None = None) -> dict:
    """Every judge of a judge check's task, and the offline detector beside it, against the gold
    labels: {suite: {judge: agreement, precision, recall, confusion, ...}}."""
    results = {}
    for suite in dict.fromkeys(it["suite"] for it in checks):
        rows = [it for it in checks if it["suite"] == suite]
        task = rows[0]["task"]
        candidates = [j for j in (judges.get(task), DetectorJudge(task)) if j]
        results[suite] = {"task": task, "n": len(rows), "judges": {}}
        for judge in dict((j.name, j) for j in candidates).values():
            verdicts = judge_all(judge, rows, out / "judge_checks" / suite, cfg, counts, usage)
            preds = [verdict_label(task, verdicts.get(it["key"])) for it in rows]
            results[suite]["judges"][judge.name] = judge_agreement(
                task, [it["label"] for it in rows], preds, [it["category"] for it in rows],
                cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    return results


def compare_runs(cfg: Config, out: Path, overwrite: bool = False) -> Path:
    """Merge the models of several runs' results.json into one table (labels clash: run:label), in
    05_eval/compare/, with the stage folder locked like any other run of the stage (`--overwrite`
    clears compare/ only: the folder's own evaluation and caches are not this mode's to delete)."""
    with lock_stage(out):
        if overwrite and (out / "compare").exists():
            shutil.rmtree(out / "compare")
        return write_compare(cfg, out)


def write_compare(cfg: Config, out: Path) -> Path:
    runs = {str(folder): load_results(folder) for folder in cfg.compare}
    # numbers judged under other policies, by another judge or another template or decoding, are not comparable
    mixed = standard_difference({folder: judging_standard(data) for folder, data in runs.items()})
    if mixed and not cfg.compare_mixed:
        raise InputError(f"eval.compare: the runs were judged under different standards or protocols ({mixed}); "
                         "set eval.compare_mixed: true to compare them anyway")
    results, info = {}, {}
    for data in runs.values():
        for label, metrics, model_info in setting_columns(data):
            key = label if label not in results else f"{data['run_name']}:{label}"
            results[key], info[key] = metrics, model_info
    (out / "compare").mkdir(exist_ok=True)
    manifest = Manifest(out / "compare", "05_eval", asdict(cfg), resume_ignores=tuple(asdict(cfg)))
    first = next(iter(runs.values()), {})
    details = {"mixed_standards": mixed} if mixed else {"judges": first.get("judges"),
                                                         "judge_policies": first.get("judge_policies")}
    report = write_comparison(results, out / "compare", info, title=f"Comparison of {', '.join(map(str, cfg.compare))}",
                              details=details)
    manifest.finish(models=len(results))
    print(f"report: {report}")
    return out / "compare"


def setting_columns(data: dict):
    """(label, metrics, model info) of a results.json's models: `<label> @ <setting>` for each
    inference-time setting when it has several, else its `models` as they are."""
    settings = data.get("settings") or {}
    if len(settings) < 2:
        return [(label, metrics, data["model_info"][label]) for label, metrics in data["models"].items()]
    return [(f"{label} @ {name}", settings[name]["models"][label], {**data["model_info"][label], "setting": name})
            for label in data["model_info"] for name in settings if label in settings[name]["models"]]


def main(cfg: Config, overwrite: bool = False) -> Path:
    if cfg.compare:
        return compare_runs(cfg, stage_dir(cfg, "05_eval"), overwrite)
    models = resolve_models(cfg) if cfg.models else {}
    if cfg.judge_reasoning and cfg.judges.get("safety") in (None, "none", False):
        raise InputError("eval.judge_reasoning: the reasoning is read by the safety judge, and eval.judges.safety is none")
    greedy = [label for label, llm in models.items() if cfg.samples > 1 and not llm.temperature > 0]
    if greedy:  # K greedy answers are one answer K times: Safe@K would equal Safe@1
        raise InputError(f"eval.samples: {cfg.samples} answers per prompt need sampling, but '{greedy[0]}' generates "
                         "with temperature 0; set eval.generation.temperature > 0 (SafeChain samples at 0.6) or eval.samples: 1")
    check_judges(cfg.judges, cfg.judge_templates)  # an LLM judge's template too: a broken one stops before any model loads
    self_judging = self_judged(cfg, models)
    settings = inference_settings(cfg)
    specs = [suite_spec(entry) for entry in cfg.suites]
    if len({s.name for s in specs}) != len(specs):
        raise InputError("eval.suites: a suite is listed twice")
    # eval.limit and eval.sample trim what the models answer; a judge check keeps every label unless it says otherwise
    items = [it for spec in specs for it in load_suite(spec, *((None, cfg.judge_templates, None) if spec.kind == "judge_check"
                                                                  else (cfg.limit, cfg.judge_templates, cfg.sample)), seed=cfg.seed)]
    checks = [it for it in items if it["kind"] == "judge_check"]
    if any(it["kind"] != "judge_check" for it in items) and not models:
        raise InputError("eval.models: no models to evaluate (only judge_check suites run without one)")
    # A request the run trained on is removed, not just flagged: it would score memory, not generalisation.
    trained, trained_files = training_prompts(cfg.runs_dir, {cfg.run_name} | {
        str(e["from_run"]).rpartition("/")[0] for e in cfg.models if isinstance(e, dict) and e.get("from_run")})
    suites = suite_info(items, trained)
    loaded, items = items, [it for it in items if it["kind"] != "judge_check" and not contaminated(it, trained)]
    # Every model answers every item under every setting; the key hashes the chat, so settings never share a cache entry.
    items = [{**it, "setting": name, "chat": setting_chat(setting, it["prompt"], cfg.system_prompt)}
             for name, setting in settings.items() for it in items]
    for it in items:
        it["key"] = f"{it['suite']}/{it['id']}@{digest(it['chat'])}"
    if cfg.samples > 1:  # each draw is its own cached generation; draw 0 keeps the one-answer key and its cache
        items = [{**it, "sample": k, "key": it["key"] + (f"#{k}" if k else "")} for it in items for k in range(cfg.samples)]
    for it in checks:
        it["key"] = f"{it['suite']}/{it['id']}"
    policy_set = load_policies(cfg.judge_policies)
    # The stage folder is locked while this process writes it (safecot/stage.py).
    with open_stage(cfg, "05_eval", overwrite, resume_ignores=(
            "llm", "models", "suites", "limit", "sample", "generation", "judges", "judge", "allow_self_judge", "chunk_size",
            "bootstrap_samples", "confidence", "policy_prompt", "judge_policies", "compare_mixed", "judge_reasoning",
            "samples"), seed=False) as st:
        out, manifest = st.out, st.manifest
        manifest.input("judge_policies", cfg.judge_policies, len(policy_set.policies))
        manifest.input("judge_templates", cfg.judge_templates)
        for name, setting in settings.items():
            if setting["policy_prompt"]:
                manifest.input(f"policy_prompt:{name}", setting["policy_prompt"])
        for path in trained_files:  # what contamination was measured against: a rerun of stage 1 removes other items
            manifest.input(f"training_prompts:{path.parent.parent.name}/{path.parent.name}", path)
        for spec in specs:  # what each suite was read from, hashed: an edited file shows in the manifest
            manifest.input(f"suite:{spec.name}", spec.source, sum(it["suite"] == spec.name for it in loaded),
                           split=spec.split if spec.source.startswith("hf:") else None)
            if spec.kind == "jailbreak":
                manifest.input(f"suite:{spec.name}:templates", spec.templates or "data/eval/jailbreak_templates")
        for label, llm in models.items():  # a retrained adapter is another model under the same label
            if llm.adapter:
                manifest.input(f"adapter:{label}", llm.adapter)
        if st.unchanged():  # evaluated before with this config and these inputs: nothing to redo or rewrite
            return out
        set_seed(cfg.seed)  # only now: a rerun with nothing to do need not import torch
        counts = {"generated": 0, "generation_errors": 0, "judged": 0, "judge_errors": 0}
        usage = scheduler.Usage()  # what the backends did, failed requests by kind

        generations = {}
        for label, llm in models.items():
            check_model_folder(out / label, label, llm, cfg.system_prompt)
            generations[label] = generate(label, llm, items, out / label, cfg, counts, usage)
            release_backends()  # one model in memory at a time
            gc.collect()

        judge_llm = cfg.llm.merged(cfg.judge)
        judges = {t: make_judge(t, cfg.judges.get(t), judge_llm, policy_set.text(), cfg.judge_templates) for t in TASKS}
        judges["choice"] = ChoiceJudge()
        samples = []
        by_setting = {name: {"policy_prompt": s["policy_prompt"], "models": {}, "truncated": {}} for name, s in settings.items()}
        for label in models:
            done = [{**it, **generations[label][it["key"]], "id": f"{it['suite']}/{it['id']}"}
                    for it in items if it["key"] in generations[label]]
            verdicts = {}
            for task, judge in judges.items():
                # A truncated answer is missing, never judged: an empty answer would pass for a refusal.
                wanted = [it for it in done if not it.get("truncated")
                          and (task in TASKS_BY_KIND[it["kind"]] or (task == "cot" and it["kind"] != "utility"))]
                if judge and wanted:
                    wanted = [{**it, "prompt": it.get("forbidden_prompt", it["prompt"])} for it in wanted]
                    verdicts[task] = judge_all(judge, wanted, out / label, cfg, counts, usage)
            if cfg.judge_reasoning and judges["safety"]:
                asked = [{**it, "prompt": it.get("forbidden_prompt", it["prompt"])} for it in done]
                verdicts[THOUGHTS] = judge_thoughts(judges["safety"], asked, out / label, cfg, counts, usage)
            rows = [{**{k: v for k, v in it.items() if k not in ("key", "chat")}, "model": label,
                     "judgements": {t: {k: x for k, x in v[it["key"]].items() if k not in ("id", "task")}
                                    for t, v in verdicts.items() if it["key"] in v}} for it in done]
            samples += rows
            for name, block in by_setting.items():
                mine = [r for r in rows if r["setting"] == name]
                block["truncated"][label] = sum(bool(r.get("truncated")) for r in mine)
                block["models"][label] = compute_metrics(mine, cfg.bootstrap_samples, cfg.confidence, cfg.seed, cfg.samples)
        judge_checks = check_judges_on_labels(checks, judges, out, cfg, counts, usage) if checks else {}
        if checks:
            (out / "judge_checks.json").write_text(json.dumps(judge_checks, indent=2), encoding="utf-8")
            manifest.output("judge_checks", out / "judge_checks.json")

        write_jsonl(out / "samples.jsonl", samples)
        info = {label: {"model": llm.model, "adapter": llm.adapter, "backend": llm.backend} for label, llm in models.items()}
        judge_names = {t: (j.name if j else None) for t, j in judges.items()}
        protocols = {t: judge_protocol(j) for t, j in judges.items()}  # what compare checks before one table
        standard = {"path": cfg.judge_policies, "sha256": file_hash(cfg.judge_policies)}
        first = next(iter(by_setting.values()))  # `models` and `truncated` keep their meaning for every older reader
        data = {"run_name": cfg.run_name, "models": first["models"], "model_info": info, "judges": protocols,
                "judge_policies": standard, "self_judged": self_judging, "truncated": first["truncated"],
                "settings": by_setting, "suites": suites, "config": asdict(cfg)}
        (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        columns = setting_columns(data)
        report = write_comparison({c: m for c, m, _ in columns}, out, {c: i for c, _, i in columns},
                                  title=f"Stage 5 evaluation: run {cfg.run_name}",
                                  details={"suites": suites, "self_judged": self_judging, "judge_checks": judge_checks,
                                           "judges": protocols, "judge_policies": standard,
                                           "settings": {n: s["policy_prompt"] for n, s in settings.items()}})
        for name in ("samples", "results", "table", "report"):
            path = out / {"samples": "samples.jsonl", "results": "results.json", "table": "table.csv", "report": "report.md"}[name]
            manifest.output(name, path)
        missing = sum(1 for label in models for it in items if it["key"] not in generations[label])
        st.finish(missing=missing, what="generations", models=len(models), items=len(items), judge_check_items=len(checks),
                  missing_generations=missing, truncated_answers={n: b["truncated"] for n, b in by_setting.items()},
                  judges=judge_names, self_judged=self_judging,
                  train_overlap_removed={k: v["train_overlap_removed"] for k, v in suites.items()}, this_session=counts,
                  failures=usage.failures)
        for name, d in suites.items():
            if d["train_overlap_removed"]:
                print(f"suite '{name}': {d['train_overlap_removed']} items ({d['train_overlap']} prompts) are among this "
                      f"run's training prompts and were left out; {d['items']} evaluated")
        print(f"report: {report}")
        return out


if __name__ == "__main__":
    run_cli("eval", Config, main, __doc__)
