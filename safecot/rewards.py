"""GRPO's rewards for stage 4 (CADA, Jin et al. 2026): trl reward functions over one batch of sampled
answers. A judge under the codes (an LLM with reward_judge.txt, or without one the offline refusal
detector on the dataset's labels) plus a format reward for reasoning in <think>...</think> followed
by an answer. An answer cut off at max_completion_length and an answer the judge gave no verdict are
handled so that neither can beat a finished answer (TRUNCATED, Completions.unscored).
"""
from __future__ import annotations

import logging

from .chat import reasons_then_answers
from .judges import detect_refusal, parse_reward_verdict, split_reasoning
from .templates import load_policies, load_template

LABELLED = ("harmful", "benign", "borderline")  # what the rule-based reward can score; `unknown` it cannot
LOWEST = -1.0                           # the bottom of the judge's scale: rules give -1 or 1, the LLM judge (score - 3) / 2
# What GRPO does with an answer cut off at max_completion_length. `lowest` (the default): the judge's
# lowest score and no format reward, the bottom of both scales, as R1-style rule rewards give an
# unfinished answer no correctness and no format reward; rambling to the limit then never beats
# finishing, however many answers are cut off (when a whole group is, it ties and teaches nothing). It
# also penalises a careful answer that needed more tokens: keep max_completion_length above the
# answers' usual length. `mask`: DAPO's overlong filtering, trl's mask_truncated_completions; its
# tokens leave the loss (policy, KL, token count), and since every reward is None for it trl leaves it
# out of its group's mean and std (advantage 0). No length penalty, but nothing pushes the policy to
# finish either: with many cut-offs the learning signal starves.
TRUNCATED = ("lowest", "mask")


class Completions:
    """The sampled answers of one reward step as whole assistant turns: the reasoning prefill of the
    prompt given back (R1-style templates open <think> themselves); whether each ran out of tokens
    (its last token is not an end of turn, as trl itself decides); what a cut-off answer gets from
    each reward (`truncated`, see TRUNCATED); and which answers the judge gave no verdict."""

    def __init__(self, fmt, stop_ids: set[int], truncated: str = "lowest"):
        self.fmt, self.stop_ids = fmt, stop_ids
        self.cut_judge, self.cut_format = (LOWEST, 0.0) if truncated == "lowest" else (None, None)
        self._unscored: tuple[list | None, set[int]] = (None, set())

    def texts(self, completions) -> list[str]:
        return [self.fmt.completion(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

    def truncated(self, completion_ids) -> list[bool]:
        return [not ids or ids[-1] not in self.stop_ids for ids in completion_ids]

    def unscored(self, completions, marked: list[int] | None = None) -> set[int]:
        """The answers of this batch that the judge marked (`marked`) as having no verdict. trl sums a
        None reward as 0 and leaves an answer out of its group's mean only when every reward is None,
        so the format reward, which trl calls on the same batch right after the judge, gives them None
        too; otherwise a format-only reward would sit mid-scale among its judged group."""
        if marked is not None:
            self._unscored = (completions, set(marked))
        batch, found = self._unscored
        return found if batch is completions else set()


def answer_of(text: str) -> str:
    return split_reasoning(text)[1]


def refusal_reward(turns: Completions):
    """Rule-based judge (stage 5's offline refusal detector) on the dataset's labels: refusing, fully
    or partly, is right on harmful prompts and wrong on benign/borderline ones. An unlabelled prompt
    (`unknown`) gets no reward (None), never the benign one: its whole group has only the format
    reward. A truncated answer gets the lowest (or, with mask, None)."""
    def refusal_reward(prompts, completions, completion_ids, label, **_) -> list[float | None]:  # trl logs it by this name
        out = []
        for text, cut, lab in zip(turns.texts(completions), turns.truncated(completion_ids), label):
            refused = detect_refusal(answer_of(text))["class"] != "full_compliance"
            right = refused == (lab == "harmful")
            out.append(turns.cut_judge if cut else None if lab not in LABELLED else 1.0 if right else -1.0)
        return out
    return refusal_reward


def format_reward(turns: Completions):
    """1 for reasoning in <think>...</think> followed by an answer that ended by itself, else 0; None
    for an answer the judge left unscored (and, with mask, a truncated one)."""
    def format_reward(completions, completion_ids, **_) -> list[float | None]:
        skip = turns.unscored(completions)
        return [None if i in skip else turns.cut_format if cut else float(reasons_then_answers(text))
                for i, (text, cut) in enumerate(zip(turns.texts(completions), turns.truncated(completion_ids)))]
    return format_reward


def judge_reward(judge_cfg: dict, templates: str, stats: dict, turns: Completions, policies: str):
    """A backend judge under the codes (template reward_judge.txt): it reads the request, the codes
    with their cases and the answer, decides whether the request is harmful (HARMFUL: yes/no), then
    scores the answer (SCORE: 1-5: safety if harmful, helpfulness without refusal if not), mapped to
    [-1, 1]. The dataset's label is not shown to it; how often its decision differs from a known
    label is counted. Truncated answers are not judged (they get the lowest score, or None with
    mask). A failed request (judge_errors) or a reply without both lines (judge_unreadable) is no
    verdict: None, and the answer is left out of its group (Completions.unscored)."""
    from .backends import Agent, LLMConfig
    from .dataclass_io import from_dict
    agent, tpl = Agent("reward_judge", from_dict(LLMConfig, judge_cfg, where="dpo.judge")), load_template("reward_judge", templates)
    codes = load_policies(policies).text()

    def judge_score(prompts, completions, completion_ids, label, request, **_) -> list[float | None]:
        texts, cut = turns.texts(completions), turns.truncated(completion_ids)
        todo = [i for i in range(len(texts)) if not cut[i]]
        chats = [tpl.chat(prompt=request[i], response=answer_of(texts[i]), policies=codes) for i in todo]
        scores = [turns.cut_judge if c else None for c in cut]
        unscored = []
        # One call for trl's whole batch: the reward step needs every score before it goes on, so
        # there is no later step to overlap with (openai: up to max_concurrency requests at once).
        for i, gen in zip(todo, agent(chats, schema=tpl.schema)):
            decided, score = (None, None) if gen.error else parse_reward_verdict(gen.text)
            if decided is None or score is None:
                kind = "judge_errors" if gen.error else "judge_unreadable"
                stats[kind] = stats.get(kind, 0) + 1
                unscored.append(i)
                continue
            stats["judge_harmful"] = stats.get("judge_harmful", 0) + decided
            if label[i] in ("harmful", "benign"):
                stats["judge_differs_from_label"] = stats.get("judge_differs_from_label", 0) + (decided != (label[i] == "harmful"))
            scores[i] = (score - 3) / 2
        turns.unscored(completions, unscored)
        stats["judged"] = stats.get("judged", 0) + len(todo)
        stats["truncated_completions"] = stats.get("truncated_completions", 0) + sum(cut)
        return scores

    return judge_score


def quiet_unscored(record: logging.LogRecord) -> bool:
    """trl warns, printing the whole prompt, for each batch with a completion whose every reward is
    None; here that is by design (mask, a judge without verdict), and counted (the manifest's judge
    counts, metrics.jsonl's completions/clipped_ratio)."""
    return "All reward functions returned None" not in record.getMessage()
