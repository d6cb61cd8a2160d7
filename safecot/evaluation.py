"""Stage 5's answers and verdicts, every answer judged as soon as it exists, so a served judge
works while the models still answer (safecot/scheduler.py drives it all).

1. `answers_here`: each model under test that loads in this process (hf, vllm, ...) answers
   alone, `chunk_size` items per batched call, and is released before the next one loads. No
   judge is loaded yet: a judge on the GPU (the recipes' guards) never shares it with a model
   under test.
2. `answer_and_judge`: one scheduler run over every (model, item): a served model (backend
   `openai`) generates the answer, or any model's answer is read from its cache, and then every
   judge of the item's tasks that needs no model here (served, or rule-based) is asked at once
   (and, with `judge_reasoning`, the safety judge about the reasoning), each verdict saved as it
   comes back. `chunk_size` items (at least twice the largest openai concurrency) are in flight,
   so no server waits for the next item.
3. `answer_and_judge(..., answer=False)` once per judge that loads in this process (a guard or
   an LLM judge on `hf`): it loads, judges every answer in batched calls, and is released before
   the next one loads, so one 24 GB GPU holds one judge at a time.

The caches are stage 5's, as they always were, so a rerun reuses them and one that finds
everything cached asks nothing:
- `<label>/generations.jsonl`: one answer per item key (which hashes the chat sent);
- `<label>/judgements/<task>--<judge>[--<hash of its settings>].jsonl`: one verdict per item key
  and hash of what the judge reads (request, reasoning, answer); the reasoning's verdicts are the
  safety judge's, under `<key>/thoughts#<hash>`.
A failed request is counted and not cached (the next run asks again); a truncated answer is never
judged: an empty answer would pass for a refusal.
"""
from __future__ import annotations

import gc
import hashlib
import json
import queue
import threading
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from . import scheduler
from .backends import Agent, LLMConfig, release_backends
from .judges import TASKS_BY_KIND, judge_file_name, split_reasoning, unfinished
from .metrics import SAFETY_KINDS, THOUGHTS
from .records import RecordWriter
from .scheduler import Request, together


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def verdict_id(it: dict) -> str:
    """An item's id in a verdict cache: its answer's key and a hash of what the judge reads, so an
    edited prompt, reasoning or answer is judged again."""
    return f"{it['key']}#{digest([it['prompt'], it.get('reasoning', ''), it['answer']])}"


class Saver:
    """Appends records on a thread of its own: each is on disk moments after it exists, and the
    scheduler's loop does not wait for the disk meanwhile (RecordWriter syncs every record: ~4 ms,
    7 s of 1,800 verdicts and answers in benchmarks/bench_eval.py)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="05_eval-saver", daemon=True)
        self.thread.start()

    def write(self, writer: RecordWriter, record: dict) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((writer, record))

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            try:
                job[0].write(job[1])
            except BaseException as e:  # noqa: BLE001 - raised in the stage's thread by the next write or close
                self.error = self.error or e

    def close(self) -> None:
        """Wait until every record is written."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Model:
    """A model under test and its caches, 05_eval/<label>/ (open for appending)."""

    def __init__(self, label: str, llm: LLMConfig, folder: Path):
        self.label, self.llm, self.folder = label, llm, folder
        self.generations = RecordWriter(folder / "generations.jsonl")
        self.verdicts: dict[str, RecordWriter] = {}    # judge file name -> its cache, opened when first used
        self._agent = None

    @property
    def agent(self) -> Agent:
        if self._agent is None:  # loaded only once something is to be generated
            self._agent = Agent(f"model_{self.label}", self.llm)
        return self._agent

    def cache(self, judge) -> RecordWriter:
        name = judge_file_name(judge)
        if name not in self.verdicts:
            self.verdicts[name] = RecordWriter(self.folder / "judgements" / name)
        return self.verdicts[name]

    def close(self) -> None:
        for writer in (self.generations, *self.verdicts.values()):
            writer.close()


class Evaluation:
    """The models' answers to the items and the judges' verdicts on them, cached (module docstring).
    `counts` gets generated, generation_errors, judged and judge_errors; `usage` what the backends did."""

    def __init__(self, judge_reasoning: bool, chunk_size: int, counts: dict, usage: scheduler.Usage | None = None):
        self.judge_reasoning, self.chunk_size = judge_reasoning, chunk_size
        self.counts, self.usage = counts, usage if usage is not None else scheduler.Usage()
        self.judges: dict = {}          # {task: Judge or None}, with `choice`
        self.by_suite: dict = {}        # {suite: {task: Judge}}: a suite's own judges over `judges` (its `judges:` key)
        self.active: set | None = None  # ids of the judges asked in this run (None: all)
        self.saver: Saver | None = None

    # ---- one item ----
    def answer(self, model: Model, it: dict):
        """The model's answer to `it` from its cache, or generated and saved -> the item with the
        answer's fields (None if the request failed)."""
        done = model.generations.done.get(it["key"])
        if done is None:
            gen = yield Request(model.agent, it["chat"], step="generate")
            if gen.error:  # left for the next run
                self.counts["generation_errors"] += 1
                return None
            reasoning, answer = split_reasoning(gen.text)
            done = {"id": it["key"], "model": model.label, "suite": it["suite"], "item": it["id"], "chat": it["chat"],
                    "text": gen.text, "reasoning": reasoning, "answer": answer, "tokens": gen.tokens,
                    "truncated": gen.truncated or unfinished(gen.text)}
            self.saver.write(model.generations, done)
            self.counts["generated"] += 1
        return {**it, **done, "id": f"{it['suite']}/{it['id']}"}

    def asked(self, it: dict) -> list[tuple[str, object, dict]]:
        """(task, judge, what it reads) for every verdict an answer needs: its suite's tasks, the
        CoT grades of any reasoning but MMLU's, and the reasoning read as the answer by the safety
        judge (judge_reasoning). Every judge reads a jailbreak's request without its wrapper."""
        if it.get("truncated"):
            return []
        read = {**it, "prompt": it.get("forbidden_prompt", it["prompt"])}
        tasks = dict.fromkeys([*self.judges, *self.by_suite.get(it["suite"], {})])
        out = [(task, self.judge_for(task, it), read) for task in tasks
               if task in TASKS_BY_KIND[it["kind"]] or (task == "cot" and it["kind"] != "utility")]
        if self.thoughts_judged(it) and (it.get("reasoning") or "").strip():
            out.append((THOUGHTS, self.judge_for("safety", it), {**read, "key": f"{it['key']}/thoughts",
                                                                 "answer": it["reasoning"], "reasoning": ""}))
        return [(task, judge, r) for task, judge, r in out
                if judge and (self.active is None or id(judge) in self.active)]

    def judge_for(self, task: str, it: dict):
        """The judge of `task` for this item: its suite's own, else the stage's."""
        return self.by_suite.get(it["suite"], {}).get(task) or self.judges.get(task)

    def thoughts_judged(self, it: dict) -> bool:
        return bool(self.judge_reasoning and self.judge_for("safety", it) and it["kind"] in SAFETY_KINDS
                    and not it.get("truncated"))

    def judge(self, model: Model, it: dict):
        """Every verdict `it` needs and has not got, asked together, each saved as it comes back."""
        wanted = {}
        for task, judge, read in self.asked(it):
            cache, vid = model.cache(judge), verdict_id(read)
            if vid not in cache.done:
                wanted[task] = self.verdict(judge, read, cache, vid)
        yield from together(wanted)

    def verdict(self, judge, read: dict, cache: RecordWriter, vid: str):
        verdict = yield from judge.verdict(read)
        if verdict.get("error"):  # left for the next run
            self.counts["judge_errors"] += 1
            return
        self.saver.write(cache, {"id": vid, "task": judge.task, **verdict})
        self.counts["judged"] += 1

    def answered_and_judged(self, unit: tuple[Model, dict]):
        model, it = unit
        answered = yield from self.answer(model, it)
        if answered is not None:
            yield from self.judge(model, answered)
        return answered is not None

    # ---- every model ----
    def answers_here(self, models: list[Model], items: list[dict]) -> None:
        """Step 1: the models loaded in this process answer, one model in memory at a time."""
        units = list({it["key"]: it for it in items}.values())  # two settings that send one chat share one answer
        for model in models:
            if model.llm.backend == "openai":
                continue
            todo = [it for it in units if it["key"] not in model.generations.done]
            if todo:
                bar = tqdm(total=len(todo), desc=f"05_eval {model.label}: generate", unit="item")
                with self.saving():
                    scheduler.run(todo, lambda it, m=model: self.answer(m, it), lambda a: a is not None,
                                  self.chunk_size, bar, self.usage)
                bar.close()
            model._agent = None
            release_backends()  # one model in memory at a time
            gc.collect()

    def answer_and_judge(self, models: list[Model], items: list[dict], judges: list, answer: bool = True) -> None:
        """Step 2: one scheduler run in which the served models answer and every answer is judged as
        soon as it exists by `judges` (of `self.judges` and `self.by_suite`); a model loaded here is
        not loaded again (what it failed to answer waits for the next run). `answer=False`: only
        judge the answers there are (step 3)."""
        self.active = {id(j) for j in judges}
        units = list({it["key"]: it for it in items}.values())
        work = [(m, it) for m in models for it in units
                if (answer and m.llm.backend == "openai") or it["key"] in m.generations.done]
        pending = [m for m in models if answer and m.llm.backend == "openai"
                   and any(it["key"] not in m.generations.done for it in units)]
        agents = [m.agent for m in pending] + [a for j in judges for a in j.agents]
        bar = tqdm(total=len(work), desc="05_eval: answer and judge", unit="answer")
        try:
            with self.saving():
                scheduler.run(work, self.answered_and_judged, bool, scheduler.pool_size(self.chunk_size, agents), bar,
                              self.usage)
        finally:
            self.active = None
        bar.close()

    @contextmanager
    def saving(self):
        """Records written by a Saver for the block, all on disk when it ends (even on an error)."""
        self.saver = Saver()
        try:
            yield
        finally:
            self.saver.close()

    def results(self, model: Model, items: list[dict]) -> tuple[list[dict], dict]:
        """(the items the model answered, with the answer's fields; {task: {item key: verdict}}),
        read from the caches. An answer with no reasoning said nothing unsafe in it: its thoughts
        count as safe, unjudged."""
        done = [{**it, **model.generations.done[it["key"]], "id": f"{it['suite']}/{it['id']}"}
                for it in items if it["key"] in model.generations.done]
        verdicts: dict[str, dict] = {task: {} for task in [*self.judges, *(t for j in self.by_suite.values() for t in j),
                                                           THOUGHTS]}
        for it in done:
            for task, judge, read in self.asked(it):
                found = model.cache(judge).done.get(verdict_id(read))
                if found is not None:
                    verdicts[task][it["key"]] = found
            if self.thoughts_judged(it) and not (it.get("reasoning") or "").strip():
                verdicts[THOUGHTS][it["key"]] = {"safe": True, "no_reasoning": True}
        return done, {task: found for task, found in verdicts.items() if found}


def judge_all(judge, items: list[dict], folder: Path, chunk_size: int, counts: dict,
              usage: scheduler.Usage | None = None) -> dict:
    """One judge's verdicts on a list (the judge checks' labelled answers), cached in the
    judge's file under `folder` like the models' verdicts. -> {item key: verdict}."""
    writer = RecordWriter(folder / "judgements" / judge_file_name(judge))
    keys = {it["key"]: verdict_id(it) for it in items}
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
        scheduler.run(todo, judged, save, scheduler.pool_size(chunk_size, judge.agents), bar, usage)
    bar.close()
    return {k: writer.done[v] for k, v in keys.items() if v in writer.done}
