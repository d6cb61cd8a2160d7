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
     through any backend (a served adapter is asked for by the name it is served under:
     `vllm serve <base> --enable-lora --lora-modules <name>=<adapter>`, and `llm.model: <name>` in
     its entry), under each inference-time setting of `eval.policy_prompt` (CADA's
     study): `none`, or a policy file shown in the system turn of reason_over_policies.txt, the
     template GRPO trains with. `<think>...</think>` is kept apart as the reasoning; the rest is
     the answer. An answer that ran out of tokens, or stopped inside its reasoning, is
     `truncated`: it is never judged; every rate is reported without it and, as `<metric>_strict`,
     with it counted as a failure.
  3. Judges: safety of the answer under the policies, XSTest's refusal classes, the
     StrongREJECT rubric and score, AIDSAFE's CoT grades of the reasoning; the offline refusal
     detector by default (safecot/judges.py, with its limits), an LLM judge, or the field's
     classifiers with their official prompts and output formats (safecot/guards.py: Llama
     Guard 3, WildGuard, the HarmBench classifiers, StrongREJECT's fine-tuned evaluator,
     ShieldGemma), per task (`eval.judges`) and, where a suite names its own, per suite
     (`{name: strongreject, judges: {safety: harmbench}}`). Every LLM judge reads one fixed
     standard, `eval.judge_policies`, whatever codes the run trained on, so runs stay comparable
     (a classifier reads its own published taxonomy).
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
  3c. Every answer is judged as soon as it exists (safecot/evaluation.py): a model loaded here
     answers first and is released (one model in memory at a time, judges included), then one
     scheduler run has the served models answer and every answer judged the moment it exists by
     the judges that load nothing here; then each judge that loads here judges every answer, one
     judge on the GPU at a time.
  4. Metrics with 95% bootstrap intervals, overall and per category (safecot/metrics.py), and
     the comparison table and figure (safecot/reports.py).

    python 05_eval.py --config configs/tiny.yaml
    python 05_eval.py --config configs/qwen2.5-7b.yaml "eval.models=[{label: base}]"
    python 05_eval.py --config configs/qwen2.5-7b.yaml eval.judges.cot=llm eval.judge="{model: Qwen/Qwen2.5-72B-Instruct, backend: openai, base_url: http://localhost:8000/v1}"
    python 05_eval.py --config configs/qwen2.5-7b.yaml "eval.judges.safety={kind: wildguard, backend: openai, model: allenai/wildguard, base_url: http://localhost:8001/v1}"
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
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safecot import scheduler
from safecot.backends import LLMConfig, release_backends
from safecot.evaluation import Evaluation, Model, digest, judge_all
from safecot.guards import category_counts
from safecot.models import check_loadable
from safecot.judges import (TASKS, ChoiceJudge, DetectorJudge, check_judges, judge_llm, judge_model, judge_protocol,
                            judging_standard, make_judge, standard_difference)
from safecot.metrics import compute_metrics, judge_agreement, verdict_label
from safecot.scheduler import concurrent
from safecot.records import InputError, Manifest, file_hash, stage_dir, write_jsonl
from safecot.reports import load_results, write_comparison
from safecot.stage import lock_stage, open_stage, run_cli, seed_agents, set_seed, trained_model
from safecot.suites import contaminated, load_suite, suite_info, suite_spec, training_prompts
from safecot.templates import load_policies, policy_chat


@dataclass
class Config:
    run_name: str = "tiny"              # outputs go to <runs_dir>/<run_name>/05_eval/
    seed: int = 0                       # sampling and the bootstrap
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # the base model, and every LLM judge unless overridden
    models: list = field(default_factory=lambda: [{"label": "base"}])  # {label, llm: {overrides}, adapter: folder | from_run: <run>/03_sft}; served: llm.model = its name
    suites: list = field(default_factory=lambda: ["harmful", "jailbreak", "xstest", "mmlu"])  # names or mappings (safecot/suites.py)
    limit: int | None = None            # first N source rows of every suite (judge checks: their own limit only) ...
    sample: int | None = None           # ... or N drawn at random (seeded, even over categories)
    generation: dict = field(default_factory=lambda: {"temperature": 0.0})  # LLM overrides for every model under test
    system_prompt: str = ""             # a system turn for the models under test, first in every setting ("" = none)
    policy_prompt: list = field(default_factory=lambda: ["none"])  # inference-time settings: none | a policy file, shown as GRPO does
    judges: dict = field(default_factory=lambda: {"safety": "detector", "refusal": "detector",
                                                  "strongreject": "detector", "cot": "none"})  # per task: detector | llm | none | a classifier (llamaguard3, wildguard, harmbench, harmbench_mistral, strongreject, shieldgemma) | {kind: ..., <LLM settings>}
    judge: dict = field(default_factory=lambda: {"temperature": 0.0})  # the LLM judge: settings over `llm`; name another model
    allow_self_judge: bool = False      # let a model under test judge itself (biased; the report says so)
    judge_reasoning: bool = False       # the safety judge also reads the reasoning, apart from the answer (SafeChain)
    samples: int = 1                    # answers drawn per prompt, K (SafeChain: Safe@1, Safe@K, ConsSafe@K); > 1 needs temperature > 0
    judge_policies: str = "data/policies/detailed.yaml"  # the one standard every LLM judge judges under, not the run's own codes
    judge_templates: str = "data/templates"   # judge_*.txt, grade_cot.txt, mmlu_question.txt, reason_over_policies.txt (not jailbreak ones)
    chunk_size: int = 64                # items in flight (served: at least 2x max_concurrency); a batched model's batch
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
            # A server loads the adapter itself and answers to its own name for it: asked for the
            # base model's name, it would answer with the base model, and the adapter would go untested.
            if llm.backend == "openai" and "model" not in (entry.get("llm") or {}):
                raise InputError(f"eval.models '{label}': an adapter on the openai backend is served under a name of its "
                                 f"own; give that name as llm.model in this entry (served with: vllm serve <base model> "
                                 f"--enable-lora --lora-modules <name>={adapter})")
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


def judge_specs(cfg: Config, specs: list) -> dict:
    """Every judge spec the stage runs: by task (`safety`), and a suite's own (`safety@strongreject`)."""
    return {**{t: cfg.judges.get(t) for t in TASKS}, **{f"{t}@{s.name}": j for s in specs for t, j in s.judges.items()}}


def self_judged(cfg: Config, models: dict[str, LLMConfig], wanted: dict | None = None,
                judging: LLMConfig | None = None) -> dict[str, list[str]]:
    """{task: labels of models under test whose own base model is that task's judge} (`wanted`:
    judge_specs, `judging`: eval.judge over eval.llm, as main has them already)."""
    wanted = judge_specs(cfg, [suite_spec(e) for e in cfg.suites]) if wanted is None else wanted
    judging = judging or cfg.llm.merged(cfg.judge)
    out, judge_of = {}, {}
    for task, spec in wanted.items():
        judge_of[task] = judge_model(spec, judging)  # an LLM judge or a guard: the model it runs
        if judge_of[task]:
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
            verdicts = judge_all(judge, rows, out / "judge_checks" / suite, cfg.chunk_size, counts, usage)
            preds = [verdict_label(task, verdicts.get(it["key"])) for it in rows]
            results[suite]["judges"][judge.name] = judge_agreement(
                task, [it["label"] for it in rows], preds, [it["category"] for it in rows],
                cfg.bootstrap_samples, cfg.confidence, cfg.seed)
            release_backends()  # a judge loaded here leaves the GPU before the next one loads
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
    specs = [suite_spec(entry) for entry in cfg.suites]
    if len({s.name for s in specs}) != len(specs):
        raise InputError("eval.suites: a suite is listed twice")
    judging, wanted = cfg.llm.merged(cfg.judge), judge_specs(cfg, specs)
    self_judging = self_judged(cfg, models, wanted, judging)
    settings = inference_settings(cfg)
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
        counts = {"generated": 0, "generation_errors": 0, "judged": 0, "judge_errors": 0}
        usage = scheduler.Usage()  # what the backends did, failed requests by kind

        for label, llm in models.items():
            check_model_folder(out / label, label, llm, cfg.system_prompt)
        under_test = [Model(label, llm, out / label) for label, llm in models.items()]
        evaluation = Evaluation(cfg.judge_reasoning, cfg.chunk_size, counts, usage)
        try:
            # Seeded only now (a rerun with nothing to do need not import torch), and torch only where
            # something samples in this process: served models and judges use the server's own seed.
            local = any(llm.backend != "openai" for llm in models.values())
            if local:
                set_seed(cfg.seed)
            # A judge that loads here must load: a gated one whose licence is not accepted stops now, not
            # after every answer is generated.
            for spec in wanted.values():
                runs = judge_llm(spec, judging)
                if runs and runs.backend in ("hf", "vllm"):
                    check_loadable(runs.model)
            # A model loaded here answers first and is released: one model in memory at a time.
            evaluation.answers_here(under_test, items)
            judges = {t: make_judge(t, cfg.judges.get(t), judging, policy_set.text(), cfg.judge_templates) for t in TASKS}
            judges["choice"] = ChoiceJudge()
            evaluation.judges = judges
            evaluation.by_suite = {spec.name: {t: make_judge(t, j, judging, policy_set.text(), cfg.judge_templates)
                                               for t, j in spec.judges.items()} for spec in specs if spec.judges}
            every = [j for j in [*judges.values(), *(j for own in evaluation.by_suite.values() for j in own.values())] if j]
            here = [j for j in every if not all(concurrent(a) for a in j.agents)]  # judges that load a model here
            if not local and not here:
                seed_agents(cfg.seed, [a for j in every for a in j.agents])
            elif not local:
                set_seed(cfg.seed)
            # Served models answer and every answer is judged as soon as it exists, in one scheduler run
            # (by the judges that load nothing here); then each judge that loads here, one at a time.
            evaluation.answer_and_judge(under_test, items, [j for j in every if j not in here])
            for judge in here:
                evaluation.answer_and_judge(under_test, items, [judge], answer=False)
                release_backends()
                gc.collect()
            answered = {m.label: evaluation.results(m, items) for m in under_test}
        finally:
            for model in under_test:
                model.close()
        generations = {m.label: m.generations.done for m in under_test}
        samples = []
        by_setting = {name: {"policy_prompt": s["policy_prompt"], "models": {}, "truncated": {}} for name, s in settings.items()}
        for label in models:
            done, verdicts = answered[label]
            rows = [{**{k: v for k, v in it.items() if k not in ("key", "chat")}, "model": label,
                     "judgements": {t: {k: x for k, x in v[it["key"]].items() if k not in ("id", "task")}
                                    for t, v in verdicts.items() if it["key"] in v}} for it in done]
            samples += rows
            for name, block in by_setting.items():
                mine = [r for r in rows if r["setting"] == name]
                block["truncated"][label] = sum(bool(r.get("truncated")) for r in mine)
                block["models"][label] = compute_metrics(mine, cfg.bootstrap_samples, cfg.confidence, cfg.seed, cfg.samples)
                block.setdefault("guard_categories", {})[label] = category_counts(mine)
        judge_checks = check_judges_on_labels(checks, judges, out, cfg, counts, usage) if checks else {}
        if checks:
            (out / "judge_checks.json").write_text(json.dumps(judge_checks, indent=2), encoding="utf-8")
            manifest.output("judge_checks", out / "judge_checks.json")

        write_jsonl(out / "samples.jsonl", samples)
        info = {label: {"model": llm.model, "adapter": llm.adapter, "backend": llm.backend} for label, llm in models.items()}
        # a suite's own judge is `<task>@<suite>`: compared like any task's before two runs share a table
        own = {f"{t}@{suite}": j for suite, by_task in evaluation.by_suite.items() for t, j in by_task.items()}
        judge_names = {t: (j.name if j else None) for t, j in {**judges, **own}.items()}
        protocols = {t: judge_protocol(j) for t, j in {**judges, **own}.items()}  # what compare checks before one table
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
