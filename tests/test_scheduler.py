"""safecot/scheduler.py: records' methods driven at once, with no barrier between their steps.

openai agents run against the local test server (tests/openai_server.py; its `gate` holds a
request until the test opens it, so the tests prove what goes out while another record is held);
batched agents run on the scripted backend of conftest.py. Nothing sleeps."""
from __future__ import annotations

import random
import threading

import pytest

from openai_server import OpenAITestServer
from safecot import backends, scheduler
from safecot.backends import Agent, BackendError, LLMConfig
from safecot.scheduler import Request

# How long an extra request gets to show up past a bound while the first ones are held: only an
# (expected) absence is waited for, never a success.
EXCESS_WINDOW_S = 0.2


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def openai_agent(server, **kw) -> Agent:
    kw = {"timeout_s": 20.0, "max_retries": 0, "max_concurrency": 4, **kw}
    return Agent("agent", LLMConfig(backend="openai", model="test-model", base_url=server.base_url, **kw))


def two_steps(agent):
    """A method of two turns whose contents come from the item; returns what it was answered."""
    def method(item):
        first = yield Request(agent, user(item["first"]), step="one")
        second = yield Request(agent, user(item["second"]), step="two")
        return {"id": item["id"], "texts": [first.text, second.text], "errors": [first.error, second.error]}
    return method


def run_in_thread(*args, **kw):
    out: dict = {}

    def target():
        try:
            out["usage"] = scheduler.run(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def test_openai_a_records_next_step_goes_out_while_another_record_is_held():
    # Record a's first request is held at the gate. A stage with a barrier per step would not send
    # record b's second request until a's first came back; the scheduler sends it at once.
    items = [{"id": "a", "first": "BEHAVE:gate a1", "second": "a2"},
             {"id": "b", "first": "b1", "second": "BEHAVE:gate b2"}]
    done = []
    with OpenAITestServer(gate_timeout_s=10.0) as server:
        thread, out = run_in_thread(items, two_steps(openai_agent(server)), done.append, max_records=2)
        try:
            assert server.wait_in_flight(2, timeout=10.0)  # a1 and b2 held together
            sent = [r.body["messages"][-1]["content"] for r in server.requests]
            assert sorted(sent) == ["BEHAVE:gate a1", "BEHAVE:gate b2", "b1"] and done == []
        finally:
            server.open_gate()
            thread.join(timeout=30.0)
    assert not thread.is_alive() and "error" not in out
    assert sorted(r["id"] for r in done) == ["a", "b"]
    by = {r["id"]: r for r in done}
    assert by["a"]["texts"] == ["echo: BEHAVE:gate a1", "echo: a2"]
    assert by["b"]["texts"] == ["echo: b1", "echo: BEHAVE:gate b2"]
    assert out["usage"].backend_calls == 4 and set(out["usage"].seconds) == {"one", "two"}


def test_openai_records_in_flight_are_bounded_and_refilled():
    # Five records, two in flight at most (the server's concurrency of 4 is not the bound here):
    # both held records are at the gate, a third record is not admitted until one finishes.
    items = [{"id": str(i), "first": f"BEHAVE:gate {i}", "second": f"second {i}"} for i in range(5)]
    done = []
    with OpenAITestServer(gate_timeout_s=10.0) as server:
        thread, out = run_in_thread(items, two_steps(openai_agent(server)), done.append, max_records=2)
        try:
            assert server.wait_in_flight(2, timeout=10.0)
            assert not server.wait_in_flight(3, timeout=EXCESS_WINDOW_S)
            assert len(server.requests) == 2
        finally:
            server.open_gate()
            thread.join(timeout=30.0)
        assert server.max_in_flight <= 2
    assert not thread.is_alive() and "error" not in out
    assert sorted(r["id"] for r in done) == [str(i) for i in range(5)]  # every record exactly once
    assert all(r["texts"][1] == f"echo: second {r['id']}" for r in done)


def test_openai_concurrency_bound_holds_across_records():
    items = [{"id": str(i), "first": f"BEHAVE:gate {i}", "second": "x"} for i in range(6)]
    done = []
    with OpenAITestServer(gate_timeout_s=10.0) as server:
        thread, out = run_in_thread(items, two_steps(openai_agent(server, max_concurrency=3)), done.append,
                                    max_records=6)
        try:
            assert server.wait_in_flight(3, timeout=10.0)
            assert not server.wait_in_flight(4, timeout=EXCESS_WINDOW_S)
        finally:
            server.open_gate()
            thread.join(timeout=30.0)
        assert server.max_in_flight == 3
    assert len(done) == 6 and "error" not in out


def test_openai_failed_request_is_the_records_and_a_dead_server_stops_the_run():
    items = [{"id": "bad", "first": "BEHAVE:400", "second": "never"}, {"id": "good", "first": "g1", "second": "g2"}]

    def method(item):
        gen = yield Request(agent, user(item["first"]))
        if gen.error:  # as a stage does: the record is left for the next run
            return None
        second = yield Request(agent, user(item["second"]))
        return {"id": item["id"], "text": second.text}

    with OpenAITestServer() as server:
        agent = openai_agent(server, max_concurrency=2)
        done = []
        scheduler.run(items, method, done.append, max_records=2)
        assert sorted(done, key=str) == [None, {"id": "good", "text": "echo: g2"}] or \
            sorted(done, key=str) == [{"id": "good", "text": "echo: g2"}, None]
        assert server.attempts("never") == 0
        url = server.base_url
    backends.release_backends()
    agent = Agent("decomposer", LLMConfig(backend="openai", model="m", base_url=url, max_retries=0, max_concurrency=2))
    with pytest.raises(BackendError, match="decomposer.*first 2 requests all failed"):
        scheduler.run([{"id": str(i), "first": "x", "second": "y"} for i in range(5)], method, lambda r: None,
                      max_records=4)


# ---- batched backends (hf, vllm): the scripted backend -------------------------------------------

@pytest.fixture
def echo(scripted):
    """Scripted answers 're: <content>'; every chat each call received, in order."""
    seen: list[str] = []

    def script(chat, model):
        seen.append(chat[-1]["content"])
        return f"re: {chat[-1]['content']}"
    scripted.script = script
    scripted.seen = seen
    return scripted


def turns(agent, step_of=lambda t: "turn"):
    """A method of item["n"] turns; each answer must be its own request's (no mix-up in a batch)."""
    def method(item):
        for t in range(1, item["n"] + 1):
            content = f"{item['id']} turn {t}"
            gen = yield Request(agent, user(content), step=step_of(t))
            assert gen.text == f"re: {content}"
        return item["id"]
    return method


def test_batched_tick_serves_every_pending_request_from_any_turn_and_refills(echo):
    agent = Agent("agent", LLMConfig(backend="scripted", model="m"))
    items = [{"id": f"r{i}", "n": n} for i, n in enumerate([1, 3, 2, 1, 2, 1])]
    done = []
    usage = scheduler.run(items, turns(agent), done.append, max_records=3)
    # Tick by tick: r0 finishes after its first turn and r3 takes its place, so the second call
    # serves r1's and r2's second turns with r3's first, and so on: no call waits for a step.
    assert [n for _, n in echo.calls_log] == [3, 3, 3, 1]
    assert echo.seen[3:6] == ["r1 turn 2", "r2 turn 2", "r3 turn 1"]
    assert sorted(done) == [f"r{i}" for i in range(6)] and len(done) == 6
    assert usage.backend_calls == 4 and usage.generated_tokens == sum(len(s.split()) + 1 for s in echo.seen)


def test_batched_calls_are_per_model_and_step_within_a_tick(echo):
    a = Agent("a", LLMConfig(backend="scripted", model="m"))
    b = Agent("b", LLMConfig(backend="scripted", model="other"))
    a_again = Agent("a2", LLMConfig(backend="scripted", model="m"))  # same model and settings: one call with a

    def method(item):
        agent = {"a": a, "b": b, "a2": a_again}[item["agent"]]
        yield Request(agent, user(f"{item['id']} first"), step=item["step"])
        return item["id"]

    items = [{"id": "1", "agent": "a", "step": "x"}, {"id": "2", "agent": "b", "step": "x"},
             {"id": "3", "agent": "a2", "step": "x"}, {"id": "4", "agent": "a", "step": "y"}]
    done = []
    scheduler.run(items, method, done.append, max_records=4)
    assert sorted(echo.calls_log) == [("m", 1), ("m", 2), ("other", 1)]
    assert sorted(done) == ["1", "2", "3", "4"]


def test_every_record_exactly_once_with_random_lengths_and_none_results(echo):
    rng = random.Random(0)
    agent = Agent("agent", LLMConfig(backend="scripted", model="m"))
    items = [{"id": f"r{i}", "n": rng.randint(0, 5)} for i in range(40)]
    method = turns(agent, step_of=lambda t: f"step{t % 2}")
    done = []
    scheduler.run(items, lambda item: method(item) if item["n"] else iter_none(), done.append, max_records=7)
    assert sorted(d for d in done if d) == sorted(i["id"] for i in items if i["n"])
    assert done.count(None) == sum(1 for i in items if not i["n"])
    assert len(echo.seen) == len(set(echo.seen)) == sum(i["n"] for i in items)
    assert max(n for _, n in echo.calls_log) <= 7


def iter_none():
    """A method that finishes without a request (e.g. nothing to do for this record)."""
    return None
    yield


def test_an_exception_in_a_backend_call_propagates(scripted):
    def script(chat, model):
        raise KeyboardInterrupt
    scripted.script = script
    agent = Agent("agent", LLMConfig(backend="scripted", model="m"))
    done = []
    with pytest.raises(KeyboardInterrupt):
        scheduler.run([{"id": "a", "n": 2}], turns(agent), done.append, max_records=2)
    assert done == []


def test_pool_size_covers_openai_concurrency(scripted):
    hf_like = Agent("x", LLMConfig(backend="scripted", model="m"))
    assert scheduler.pool_size(12, [hf_like]) == 12
    remote = Agent("y", LLMConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", max_concurrency=64))
    assert scheduler.pool_size(12, [hf_like, remote]) == 128


# ---- several requests in one yield ---------------------------------------------------------------

def test_a_dict_of_requests_is_answered_together_and_batched_with_other_records(echo):
    # Each record asks two independent things at once (a grade and a plain answer), then one more
    # that depends on both. Both go into the same tick as every other record's, one call per step.
    grader = Agent("grader", LLMConfig(backend="scripted", model="m", temperature=0.0))
    plain = Agent("plain", LLMConfig(backend="scripted", model="m"))

    def method(item):
        got = yield {"grade": Request(grader, user(f"grade {item['id']}"), step="grade"),
                     "plain": Request(plain, user(f"plain {item['id']}"), step="plain")}
        nothing = yield []  # nothing to ask: the method carries on at once
        last = yield Request(plain, user(f"then {got['grade'].text} / {got['plain'].text}"), step="then")
        return item["id"], got["grade"].text, got["plain"].text, nothing, last.text

    done = []
    usage = scheduler.run([{"id": "a"}, {"id": "b"}], method, done.append, max_records=2)
    assert sorted(echo.calls_log) == [("m", 2), ("m", 2), ("m", 2)]  # grade, plain, then: each for both records
    assert sorted(done) == [("a", "re: grade a", "re: plain a", [], "re: then re: grade a / re: plain a"),
                            ("b", "re: grade b", "re: plain b", [], "re: then re: grade b / re: plain b")]
    assert usage.backend_calls == 3 and set(usage.seconds) == {"grade", "plain", "then"}


def test_a_list_of_requests_comes_back_in_order_with_a_schema_each(scripted):
    seen = []

    class Spy(scripted):
        def generate(self, chats, cfg, schema=None):
            seen.append(schema)
            return super().generate(chats, cfg, schema)
    backends.BACKENDS["spy"] = Spy
    try:
        scripted.script = staticmethod(lambda chat, model: chat[-1]["content"].upper())
        agent = Agent("agent", LLMConfig(backend="spy", model="m"))

        def method(item):
            gens = yield [Request(agent, user(f"{item} {k}"), {"maximum": k}, step="s") for k in (1, 2, 3)]
            return [g.text for g in gens]
        done = []
        scheduler.run(["x"], method, done.append, max_records=1)
    finally:
        del backends.BACKENDS["spy"]
    assert done == [["X 1", "X 2", "X 3"]]
    assert seen == [[{"maximum": 1}, {"maximum": 2}, {"maximum": 3}]]  # one call, each chat its own schema


def test_openai_requests_of_one_yield_are_in_flight_together():
    def method(item):
        got = yield {"a": Request(agent, user("BEHAVE:gate a")), "b": Request(agent, user("BEHAVE:gate b"))}
        return got["a"].text, got["b"].text

    with OpenAITestServer(gate_timeout_s=10.0) as server:
        agent = openai_agent(server)
        done: list = []
        thread, out = run_in_thread([{"id": 1}], method, done.append, max_records=1)
        try:
            assert server.wait_in_flight(2, timeout=10.0)  # both held at once: neither waited for the other
            assert done == []
        finally:
            server.open_gate()
            thread.join(timeout=30.0)
    assert "error" not in out and done == [("echo: BEHAVE:gate a", "echo: BEHAVE:gate b")]


# ---- failures by kind, and the progress bar -----------------------------------------------------

class Bar:
    """What a stage's tqdm bar is told."""

    def __init__(self):
        self.n, self.postfix = 0, {}

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **kw):
        self.postfix = kw


def one_request(agent):
    def method(item):
        gen = yield Request(agent, user(item), step="ask")
        return None if gen.error else item
    return method


def test_openai_failures_are_counted_by_kind_with_their_first_message():
    items = ["BEHAVE:500-once a", "BEHAVE:bad-json b", "fine c", "BEHAVE:not-completion d", "fine e"]
    with OpenAITestServer() as server:
        done = []
        usage = scheduler.run(items, one_request(openai_agent(server, max_concurrency=4)), done.append, max_records=5)
    assert sorted(d for d in done if d) == ["fine c", "fine e"]
    assert {k: f["count"] for k, f in usage.failures.items()} == {"malformed": 2, "status 500": 1}
    assert usage.failures["status 500"]["example"].startswith("status 500: InternalServerError: transient failure")
    assert usage.failures["malformed"]["example"].startswith("malformed: ")
    lines = scheduler.failure_lines(usage.failures)
    assert [line.split(", e.g. ")[0] for line in lines] == ["2 x malformed", "1 x status 500"]
    assert lines[1] == f"1 x status 500, e.g. {usage.failures['status 500']['example']}"


def test_the_bar_counts_only_what_on_done_wrote_and_shows_the_failed(scripted):
    from safecot.backends import Generation
    scripted.script = staticmethod(lambda chat, model: Generation("", 0, error="timeout: slow")
                                   if chat[-1]["content"] in ("r1", "r3") else "ok")
    agent = Agent("agent", LLMConfig(backend="scripted", model="m"))
    written, bar = [], Bar()

    def save(item) -> bool:
        if item is None:
            return False
        written.append(item)
        return True

    usage = scheduler.run([f"r{i}" for i in range(5)], one_request(agent), save, max_records=2, bar=bar)
    assert written == ["r0", "r2", "r4"]
    assert bar.n == 3 and bar.postfix == {"failed": 2}
    assert usage.failures == {"timeout": {"count": 2, "example": "timeout: slow"}}
