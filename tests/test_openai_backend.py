"""The `openai` backend against a local OpenAI-compatible test server (tests/openai_server.py):
answers, retries, errors per request, timeouts, bad bodies, the concurrency bound and the API key.
Everything runs on 127.0.0.1 and nothing sleeps."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from openai_server import OpenAITestServer
from safecot import backends
from safecot.backends import Agent, BackendError, LLMConfig, error_kind

# How long an extra request gets to show up past the concurrency bound while the first ones are
# held: only an (expected) absence is waited for, never a success.
EXCESS_WINDOW_S = 0.2


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Backends are cached by (backend, model, ..., base_url): start and end each test with none.
    Keep any proxy setting of the environment away from 127.0.0.1."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    backends.release_backends()
    yield
    backends.release_backends()


@pytest.fixture
def server():
    with OpenAITestServer() as s:
        yield s


def cfg_for(server, **kw) -> LLMConfig:
    kw = {"timeout_s": 5.0, "max_retries": 2, "max_concurrency": 4, **kw}
    return LLMConfig(backend="openai", model="test-model", base_url=server.base_url, **kw)


def user(content: str) -> list[dict]:
    return [{"role": "system", "content": "You are a test."}, {"role": "user", "content": content}]


def bodies_with(server, content: str) -> list[dict]:
    return [r.body for r in server.requests if r.body["messages"][-1]["content"] == content]


def test_success_returns_texts_in_order_with_token_counts(server):
    contents = [f"prompt number {i} " + "word " * i for i in range(10)]
    gens = Agent("deliberator_1", cfg_for(server))([user(c) for c in contents])
    assert [g.text for g in gens] == [f"echo: {c}".strip() for c in contents]
    assert [g.tokens for g in gens] == [len(c.split()) for c in contents]
    assert all(g.error is None for g in gens)
    assert len(server.requests) == 10
    body = server.requests[0].body
    assert server.requests[0].path == "/v1/chat/completions"
    assert body["model"] == "test-model" and body["max_tokens"] == 512
    assert body["messages"][0] == {"role": "system", "content": "You are a test."}


def test_500_once_is_retried_and_succeeds(server):
    chats = [user("BEHAVE:500-once a"), user("plain"), user("BEHAVE:500-once b")]
    gens = Agent("judge", cfg_for(server, max_retries=2))(chats)
    assert [g.error for g in gens] == [None, None, None]
    assert [g.text for g in gens] == ["echo: BEHAVE:500-once a", "echo: plain", "echo: BEHAVE:500-once b"]
    assert server.attempts("BEHAVE:500-once a") == 2 and server.attempts("BEHAVE:500-once b") == 2
    assert server.attempts("plain") == 1
    assert len(server.requests) == 5


def test_500_without_retries_is_an_error(server):
    gens = Agent("judge", cfg_for(server, max_retries=0))([user("BEHAVE:500-once c"), user("fine")])
    assert gens[0].error and "InternalServerError" in gens[0].error and gens[0].text == ""
    assert gens[1].error is None and gens[1].text == "echo: fine"
    assert server.attempts("BEHAVE:500-once c") == 1


def test_strict_templates_truncation_and_separate_reasoning(server):
    """A server whose template refuses a system turn gets the chat folded into the user turn; a
    reply cut at max_tokens is marked truncated; reasoning returned apart is put back in <think>."""
    gens = Agent("judge", cfg_for(server))([user("BEHAVE:strict"), user("BEHAVE:length"), user("BEHAVE:reasoning")])
    assert gens[0].error is None and gens[0].text == "echo: You are a test.\n\nBEHAVE:strict"
    assert server.attempts("BEHAVE:strict") == 1 and server.attempts("You are a test.\n\nBEHAVE:strict") == 1
    assert [g.truncated for g in gens] == [False, True, False]
    assert gens[2].text == "<think>\nThe request is harmless.\n</think>\n\necho: BEHAVE:reasoning"


def test_400_is_an_error_generation_not_retried(server):
    gens = Agent("refiner", cfg_for(server))([user("one"), user("BEHAVE:400"), user("three")])
    assert [g.text for g in gens] == ["echo: one", "", "echo: three"]
    assert gens[1].error and "BadRequestError" in gens[1].error and "400" in gens[1].error
    assert gens[1].tokens == 0
    assert gens[0].error is None and gens[2].error is None
    assert server.attempts("BEHAVE:400") == 1


def test_timeout_is_an_error_generation_among_successes(server):
    cfg = cfg_for(server, timeout_s=0.3, max_retries=0)
    gens = Agent("deliberator_2", cfg)([user("before"), user("BEHAVE:hang"), user("after")])
    assert [g.text for g in gens] == ["echo: before", "", "echo: after"]
    assert gens[1].error and "Timeout" in gens[1].error
    assert gens[0].error is None and gens[2].error is None
    assert server.attempts("BEHAVE:hang") == 1


@pytest.mark.parametrize("behaviour", ["bad-json", "not-completion"])
def test_bodies_that_are_not_completions_are_error_generations(server, behaviour):
    gens = Agent("intent", cfg_for(server))([user(f"BEHAVE:{behaviour}"), user("good")])
    assert gens[0].text == "" and gens[0].tokens == 0 and gens[0].error
    assert gens[1].error is None and gens[1].text == "echo: good"
    assert server.attempts(f"BEHAVE:{behaviour}") == 1     # a 200 is not retried


def test_every_request_failing_raises_backend_error_naming_the_role(server):
    agent = Agent("safety_judge", cfg_for(server))
    with pytest.raises(BackendError) as err:
        agent([user("BEHAVE:400"), user("BEHAVE:not-completion"), user("BEHAVE:bad-json")])
    message = str(err.value)
    assert "safety_judge" in message and "openai:test-model" in message
    assert "all 3 requests failed" in message and "BadRequestError" in message


def test_server_down_raises_backend_error():
    with OpenAITestServer() as gone:
        url = gone.base_url
    cfg = LLMConfig(backend="openai", model="test-model", base_url=url, timeout_s=2.0, max_retries=0)
    with pytest.raises(BackendError, match="decomposer"):
        Agent("decomposer", cfg)([user("anyone there?")])


def test_empty_call_sends_nothing(server):
    assert Agent("judge", cfg_for(server))([]) == []
    assert server.requests == []


@pytest.mark.parametrize("limit", [2, 3])
def test_concurrency_bound_holds_and_is_used(limit):
    # Gated requests are held until the test opens the gate. The server's in-flight counter wakes
    # the test as soon as `limit` are in (so more than one at once when allowed), and one more
    # must not get in while they are held: an unbounded client would send all n at once.
    n = 4 * limit + 1
    with OpenAITestServer(gate_timeout_s=10.0) as server:
        agent = Agent("deliberator_1", cfg_for(server, max_concurrency=limit, timeout_s=20.0))
        out: list = []
        call = threading.Thread(target=lambda: out.append(agent([user(f"BEHAVE:gate n{i}") for i in range(n)])))
        call.start()
        try:
            assert server.wait_in_flight(limit, timeout=10.0)
            assert not server.wait_in_flight(limit + 1, timeout=EXCESS_WINDOW_S)
            assert server.in_flight == limit
        finally:
            server.open_gate()
            call.join(timeout=30.0)
        assert not call.is_alive() and len(out) == 1
        assert [g.text for g in out[0]] == [f"echo: BEHAVE:gate n{i}" for i in range(n)]
        assert server.max_in_flight == limit
        assert len(server.requests) == n


def test_concurrency_one_is_sequential(server):
    gens = Agent("judge", cfg_for(server, max_concurrency=1))([user(f"seq {i}") for i in range(6)])
    assert server.max_in_flight == 1
    assert [g.text for g in gens] == [f"echo: seq {i}" for i in range(6)]
    assert [r.body["messages"][-1]["content"] for r in server.requests] == [f"seq {i}" for i in range(6)]


def test_api_key_comes_from_the_named_env_var_and_is_not_stored(server, monkeypatch):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("SAFECOT_TEST_API_KEY", secret)
    cfg = cfg_for(server, api_key_env="SAFECOT_TEST_API_KEY")
    gens = Agent("judge", cfg)([user("key check")])
    assert gens[0].error is None
    assert [r.authorization for r in server.requests] == [f"Bearer {secret}"]
    assert secret not in repr(dataclasses.asdict(cfg))
    assert secret not in repr(cfg)
    assert dataclasses.asdict(cfg)["api_key_env"] == "SAFECOT_TEST_API_KEY"


def test_missing_api_key_sends_placeholder(server, monkeypatch):
    monkeypatch.delenv("SAFECOT_TEST_API_KEY", raising=False)
    gens = Agent("judge", cfg_for(server, api_key_env="SAFECOT_TEST_API_KEY"))([user("no key")])
    assert gens[0].error is None
    assert server.requests[0].authorization == "Bearer not-needed"


def test_server_shuts_down_cleanly_with_a_hung_request():
    with OpenAITestServer() as server:
        cfg = cfg_for(server, timeout_s=0.2, max_retries=0)
        with pytest.raises(BackendError, match="APITimeoutError"):
            Agent("judge", cfg)([user("BEHAVE:hang")])
        assert server.in_flight == 1            # the handler is still blocked, until shutdown
    assert server.in_flight == 0                # close() released it and joined its thread


# ---- what kind of failure: error_kind ------------------------------------------------------------

@pytest.mark.parametrize("behaviour,kind", [("500-once", "status 500"), ("400", "status 400"),
                                            ("bad-json", "malformed"), ("not-completion", "malformed")])
def test_a_failed_request_says_its_kind_in_one_short_line(server, behaviour, kind):
    gens = Agent("judge", cfg_for(server, max_retries=0))([user(f"BEHAVE:{behaviour} kind"), user("fine")])
    assert error_kind(gens[0].error) == kind and gens[0].error.startswith(f"{kind}: ")
    assert "\n" not in gens[0].error and len(gens[0].error) <= 260
    assert gens[1].error is None


def test_timeout_and_connection_kinds(server):
    gens = Agent("judge", cfg_for(server, timeout_s=0.3, max_retries=0))([user("BEHAVE:hang"), user("fine")])
    assert error_kind(gens[0].error) == "timeout" and "APITimeoutError" in gens[0].error
    with OpenAITestServer() as gone:
        url = gone.base_url
    cfg = LLMConfig(backend="openai", model="test-model", base_url=url, timeout_s=2.0, max_retries=0)
    gen = backends.get_backend(cfg).generate([user("anyone there?")], cfg)[0]
    assert error_kind(gen.error) == "connection" and "APIConnectionError" in gen.error


@pytest.mark.parametrize("message,kind", [
    ("context: prompt of 9 tokens + 4 new > 8", "context"), ("status 503: APIStatusError: busy", "status 503"),
    ("HTTP 500", "status 500"), ("ValueError: no JSON", "ValueError"), ("it broke", "error"), (None, "error")])
def test_error_kind_reads_any_backends_message(message, kind):
    assert error_kind(message) == kind
