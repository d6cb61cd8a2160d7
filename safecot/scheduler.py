"""One scheduler that drives many records' methods at once, with no barrier between steps.

A stage writes each record's method as one generator that reads like the paper: it yields a
`Request` whenever it needs an agent, gets the `Generation` back, and returns the finished record
(or None to leave it for the next run):

    def method(rec):
        gen = yield Request(intent_agent, intent_tpl.chat(prompt=rec["prompt"]), intent_tpl.schema, "intent")
        ...
        return rec

    usage = run(todo, method, on_done=save, max_records=64, bar=bar)   # save(rec) -> True if written

Steps that do not depend on each other go out together: yield a dict (or list) of Requests and get
a dict (or list) of Generations back once all of them are answered, e.g.
`got = yield {"grade": Request(...), "plain": Request(...)}`. A sub-step shared by several methods
is a generator too, called with `yield from`; several sub-steps run side by side with
`yield from together([...])` (each round of their requests goes out in one yield). A Request with
`prompt` instead of `chat` is a raw-text completion (the guard classifiers' own documents), with
the log-probabilities of its `candidates` tokens when it names them.

How requests reach the backends depends on the agent:
- `openai`: each request goes out as soon as its record is ready, on a thread pool per backend
  bounded by that agent's `llm.max_concurrency`; no record waits for another's step. A server is
  kept busy as long as at least `max_concurrency` records are in flight.
- `hf`, `vllm` (and any other backend): one tick batches every pending request of every record,
  whatever its step, into one backend call per model, settings and step; the step stays in the key
  because one call's prompts then share the template's long head (the policies), which the hf
  backend prefills once per batch (its shared-prefix KV reuse). Each request keeps its own schema
  (the backends take one per chat; the refiner's bounds its record's thought numbers).
- `max_records` records are in flight at once; as one finishes the next is admitted, so batches
  stay full instead of shrinking as records finish (e.g. agents agreeing early).

`on_done(result)` gets each method's return value as soon as the method returns (the stage writes
it at once, so a kill loses only the records in flight) and returns True when it wrote it: the
progress bar counts only those, and shows the others as `failed`. A request that fails after its
retries comes back as a Generation with `error` set, for the method to handle, and is counted in
`Usage.failures` by kind (backends.error_kind; `failure_lines` says them, one line a kind); a
batched call whose every request fails raises BackendError as `Agent` does, and so does an openai
backend whose first `max_concurrency` requests all fail (a server that is down, a model it does
not serve).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Callable, Generator, Iterable

from .backends import Agent, BackendError, Generation, error_kind
from .chat import Chat


@dataclass
class Request:
    agent: Agent
    chat: Chat | None
    schema: dict | None = None          # the JSON schema of the answer (Template.schema)
    step: str = ""                      # the method's step: timings, and batches of one step
    prompt: str | None = None           # a raw-text completion instead of a chat (the guard classifiers)
    candidates: tuple | None = None     # raw: answer tokens whose first-token log-probabilities come back
    special_tokens: bool = True         # raw: the tokenizer adds its BOS (False: the prompt writes its own)

    def send(self, requests: list["Request"]) -> list[Generation]:
        """One backend call for this request and others like it (same agent, same kind)."""
        if self.prompt is not None:
            return self.agent.complete([r.prompt for r in requests], self.candidates, self.special_tokens)
        return self.agent([r.chat for r in requests], schema=[r.schema for r in requests])


@dataclass
class Usage:
    """What the backends did for one `run`: for the manifest."""
    backend_calls: int = 0
    generated_tokens: int = 0
    seconds: dict = field(default_factory=dict)     # step -> seconds spent in its calls (summed over threads)
    failures: dict = field(default_factory=dict)    # kind -> {"count": failed requests, "example": the first's error}

    def add(self, step: str, gens: list[Generation], seconds: float) -> None:
        self.backend_calls += 1
        self.generated_tokens += sum(g.tokens for g in gens)
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds
        for g in gens:
            if g.error:
                seen = self.failures.setdefault(error_kind(g.error), {"count": 0, "example": g.error})
                seen["count"] += 1


def failure_lines(failures: dict) -> list[str]:
    """One line per kind of failed request, most frequent first: `3 x status 500, e.g. status 500: ...`."""
    ranked = sorted(failures.items(), key=lambda kv: (-kv[1]["count"], kv[0]))
    return [f"{f['count']} x {kind}, e.g. {f['example']}" for kind, f in ranked]


_END = object()
Yielded = Request | list | dict                     # one request, or several answered together
Method = Callable[[dict], Generator[Yielded, object, object]]


class _Join:
    """One yield of a method: its requests, and their answers as they come in."""

    def __init__(self, gen: Generator, asked: Yielded):
        self.gen, self.asked = gen, asked
        self.keys = list(asked) if isinstance(asked, dict) else range(len(asked)) if isinstance(asked, list) else [None]
        self.answers: dict = {}

    def requests(self) -> list[tuple[object, Request]]:
        return [(k, self.asked if k is None else self.asked[k]) for k in self.keys]

    def answer(self, key, gen: Generation) -> bool:
        """Store one answer; True when every request of this yield is answered."""
        self.answers[key] = gen
        return len(self.answers) == len(self.keys)

    def value(self):
        if isinstance(self.asked, dict):
            return {k: self.answers[k] for k in self.keys}
        if isinstance(self.asked, list):
            return [self.answers[k] for k in self.keys]
        return self.answers[None]


def concurrent(agent: Agent) -> bool:
    """Agents whose requests go out one by one, as soon as ready (a server batches them itself)."""
    return agent.cfg.backend == "openai"


def pool_size(records: int, agents: Iterable[Agent]) -> int:
    """Records to keep in flight: `records`, but at least twice the largest openai concurrency, so
    a server never waits for a record to be admitted."""
    return max([records] + [2 * a.cfg.max_concurrency for a in agents if concurrent(a)])


def _timed(requests: list[Request]) -> tuple[list[Generation], float]:
    t0 = time.perf_counter()
    gens = requests[0].send(requests)
    return gens, time.perf_counter() - t0


def _one(req: Request) -> tuple[list[Generation], float]:
    """One openai request; its failure is the record's, not the run's (see `_Pools.check`). Asked of
    the backend itself: `Agent` would raise on a call of one failed request."""
    t0 = time.perf_counter()
    agent = req.agent
    try:
        if req.prompt is not None:
            gens = agent.backend.complete([req.prompt], agent.cfg, req.candidates, req.special_tokens)
        else:
            gens = agent.backend.generate([req.chat], agent.cfg, schema=req.schema)
    except BackendError as e:
        gens = [Generation("", 0, error=str(e))]
    return gens, time.perf_counter() - t0


class _Pools:
    """A thread pool per openai backend, sized by its agent's max_concurrency. Its queue is first
    come, first served: on simulated chains that beat giving the next slot to the record furthest
    along (which starves newly admitted records) or least far along (benchmarks/README.md)."""

    def __init__(self):
        self.pools: dict[int, ThreadPoolExecutor] = {}
        self.results: dict[int, list[int]] = {}     # backend -> [succeeded, failed]

    def submit(self, req: Request) -> Future:
        key = id(req.agent.backend)
        if key not in self.pools:
            self.pools[key] = ThreadPoolExecutor(max_workers=max(1, req.agent.cfg.max_concurrency),
                                                 thread_name_prefix=f"scheduler-{req.agent.role}")
            self.results[key] = [0, 0]
        return self.pools[key].submit(_one, req)

    def check(self, req: Request, gen: Generation) -> None:
        """A server that is down, or does not serve the model, fails every request: stop the run
        with one clear line rather than fail every record."""
        counts = self.results[id(req.agent.backend)]
        counts[bool(gen.error)] += 1
        if counts == [0, max(1, req.agent.cfg.max_concurrency)]:
            raise BackendError(f"{req.agent.role} ({req.agent.label}): the first {counts[1]} requests all failed; "
                               f"first: {gen.error}")

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


def _batch_key(req: Request, keys: dict) -> tuple:
    """Requests that one backend call can serve: same loaded model, same settings, same step."""
    agent = req.agent
    if id(agent) not in keys:
        keys[id(agent)] = (id(agent.backend), json.dumps(asdict(agent.cfg), sort_keys=True, default=str))
    raw = None if req.prompt is None else (req.candidates, req.special_tokens)  # a chat and a raw prompt never share a call
    return (*keys[id(agent)], req.step, raw)


def run(items: Iterable[dict], method: Method, on_done: Callable[[object], bool | None], max_records: int,
        bar=None, usage: Usage | None = None) -> Usage:
    """Run `method(item)` for every item, `max_records` at a time; see the module docstring.
    Returns what the backends did (added to `usage` when given, e.g. over several runs of a stage).
    `bar` (tqdm) advances for each result `on_done` wrote (returned True); the others are its
    `failed` postfix."""
    usage = Usage() if usage is None else usage
    todo = iter(items)
    live = unwritten = 0
    waiting: list[tuple[_Join, object, Request]] = []   # batched requests for the next tick
    futures: dict[Future, tuple[_Join, object, Request]] = {}
    pools, keys = _Pools(), {}

    def advance(gen: Generator, value) -> None:
        nonlocal live, unwritten
        while True:
            try:
                asked = gen.send(value)
            except StopIteration as stop:
                live -= 1
                written = on_done(stop.value)
                if bar is not None:
                    if written:
                        bar.update(1)
                    else:
                        unwritten += 1
                        bar.set_postfix(failed=unwritten)
                return
            join = _Join(gen, asked)
            if join.keys:
                break
            value = join.value()  # nothing asked (an empty list): carry on at once
        for key, req in join.requests():
            if concurrent(req.agent):
                futures[pools.submit(req)] = (join, key, req)
            else:
                waiting.append((join, key, req))

    def answered(join: _Join, key, gen: Generation) -> None:
        if join.answer(key, gen):
            advance(join.gen, join.value())

    def admit() -> None:
        nonlocal live
        while live < max(1, max_records):
            item = next(todo, _END)
            if item is _END:
                return
            live += 1
            advance(method(item), None)

    try:
        admit()
        while waiting or futures:
            if waiting:  # one tick: every pending batched request, one call per model and step
                tick, waiting[:] = list(waiting), []
                groups: dict[tuple, list[tuple[_Join, object, Request]]] = {}
                for entry in tick:
                    groups.setdefault(_batch_key(entry[2], keys), []).append(entry)
                for group in groups.values():
                    first = group[0][2]
                    gens, seconds = _timed([req for _, _, req in group])
                    usage.add(first.step, gens, seconds)
                    for (join, key, _), g in zip(group, gens):
                        answered(join, key, g)
                    admit()
            if futures:  # openai answers that came in meanwhile (all of them, or wait for one)
                done, _ = wait(list(futures), timeout=0 if waiting else None, return_when=FIRST_COMPLETED)
                for f in done:
                    join, key, req = futures.pop(f)
                    gens, seconds = f.result()
                    usage.add(req.step, gens, seconds)
                    pools.check(req, gens[0])
                    answered(join, key, gens[0])
                admit()
    finally:
        pools.close()
    return usage


def together(steps: list[Generator] | dict[str, Generator]):
    """Several sub-steps of one method at once (`results = yield from together([...])`): each
    step's requests of a round go out in one yield, so a judge that asks one request per harm
    type, or the verdicts of every judge of one answer, do not wait for each other. -> each step's
    return value, in order (a dict of steps: {name: its return value})."""
    if isinstance(steps, dict):
        names = list(steps)
        values = yield from together([steps[n] for n in names])
        return dict(zip(names, values))
    results: list = [None] * len(steps)
    asked: dict[int, Yielded] = {}
    for i, step in enumerate(steps):
        try:
            asked[i] = step.send(None)
        except StopIteration as stop:
            results[i] = stop.value
    while asked:
        flat, where = [], []
        for i, a in asked.items():
            keys = list(a) if isinstance(a, dict) else range(len(a)) if isinstance(a, list) else [None]
            for k in keys:
                flat.append(a if k is None else a[k])
                where.append((i, k))
        answers = yield flat
        got: dict[int, dict] = {i: {} for i in asked}
        for (i, k), gen in zip(where, answers):
            got[i][k] = gen
        for i, a in list(asked.items()):
            value = (got[i][None] if not isinstance(a, (dict, list)) else
                     {k: got[i][k] for k in a} if isinstance(a, dict) else [got[i][k] for k in range(len(a))])
            try:
                asked[i] = steps[i].send(value)
            except StopIteration as stop:
                results[i] = stop.value
                del asked[i]
    return results


def gather(items: list, method: Method, max_records: int) -> list:
    """`method(item)` for every item, in the items' order: for callers that want all the results
    at once (a judge's verdicts on a list) rather than each as it finishes."""
    results: dict[int, object] = {}

    def indexed(pair):
        i, item = pair
        return i, (yield from method(item))

    run(enumerate(items), indexed, lambda done: results.__setitem__(*done), max_records)
    return [results[i] for i in range(len(items))]
