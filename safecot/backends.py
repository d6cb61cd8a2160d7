"""LLM backends behind one interface, so any agent role (intent decomposer, deliberator,
refiner, judge...) can run on any of them, and different roles of one run on different ones.

    agent = Agent("deliberator_1", LLMConfig(backend="openai", model="qwen2.5-7b-instruct",
                                             base_url="http://localhost:8000/v1"))
    generations = agent([[{"role": "user", "content": "..."}], ...])   # one batched call

- `hf`: transformers, batched generation with left padding, optional 4-bit nf4.
- `openai`: any OpenAI-compatible server (vLLM serve, Ollama, llama.cpp server, hosted APIs);
  bounded concurrent requests, timeouts and retries with backoff (the openai client's own).
  The API key is read from the environment variable named in `api_key_env`, never stored.
- `vllm`: offline batched generation where vLLM is installed.

Structured outputs (`structured: true`): a role passes the JSON schema of its answer
(data/templates/<role>.schema.json) and the backend constrains decoding to it: `hf` with an
xgrammar grammar on the logits, `openai` with `response_format` (json_schema, strict), `vllm` with
its structured-output sampling parameters. The schema is also appended to the request's last
user turn, since a model writes better JSON when it is told which. Without the switch the schema is
ignored and the parsers read the template's labelled sections.

Chats are sent as each model's chat template can express them (safecot/chat.py: a system turn
folded into the user turn, a reasoning prefill given back to the text). A Generation says whether
it stopped at its token budget (`truncated`) rather than at the end of its turn. A request that
fails after its retries comes back as a Generation with `error` set, so one bad prompt does not
stop a run; a call whose every request fails raises BackendError (unless each failed on its own
prompt: too long for the context). An error reads `<kind>: <what happened>`, and `error_kind`
gives the kind the stages count failures by: `status 500` (any HTTP status), `timeout`,
`connection`, `malformed` (a reply that is no chat completion), `context` (an `hf` prompt whose
tokens plus max_new_tokens exceed the model's context window: not generated), else the
exception's type name.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

from tqdm.auto import tqdm

from .chat import THINK_CLOSE, THINK_OPEN, Chat, ChatFormat, fold_system, merge_runs
from .records import batched


@dataclass
class LLMConfig:
    backend: str = "hf"                 # hf | openai | vllm
    model: str = "tiny"                 # Hub id, local folder, served model name, or `tiny`
    adapter: str | None = None          # LoRA adapter folder (hf, vllm)
    load_in_4bit: bool = False          # hf: nf4 double-quantised weights (QLoRA's format)
    dtype: str = "auto"                 # auto = bf16 on a GPU that has it, else fp32
    temperature: float = 0.7            # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 16                # hf: sequences per generate() call
    share_prefix: bool = True           # hf: run a batch's common prompt head (policies) once
    base_url: str | None = None         # openai: e.g. http://localhost:8000/v1
    api_key_env: str = "OPENAI_API_KEY" # openai: the variable holding the key (never the key)
    max_concurrency: int = 8            # openai: requests in flight at once
    timeout_s: float = 120.0            # openai: per request
    max_retries: int = 3                # openai: retries with exponential backoff
    structured: bool = False            # constrain each role's answer to its JSON schema (data/templates/*.schema.json)
    structured_max_chars: int | None = None  # structured: cap every string of an answer (the random tiny model never closes one)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend '{self.backend}' (known: {', '.join(sorted(BACKENDS))})")

    # What changes the text a model writes, as opposed to how fast or in what batches it runs:
    # stage 5 keys its caches of generations and verdicts on these.
    OUTPUT_KEYS = ("backend", "model", "adapter", "load_in_4bit", "dtype", "temperature", "top_p",
                   "max_new_tokens", "base_url", "structured", "structured_max_chars")

    def output_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.OUTPUT_KEYS}

    def merged(self, overrides: dict | None) -> "LLMConfig":
        """This config with a role's overrides on top (e.g. a different model for one agent)."""
        from .dataclass_io import from_dict
        return from_dict(LLMConfig, {**asdict(self), **(overrides or {})}, where="llm")


@dataclass
class Generation:
    text: str
    tokens: int = 0                     # generated tokens, for throughput figures
    error: str | None = None            # set when the request failed after its retries
    truncated: bool = False             # stopped at max_new_tokens, not at the end of its turn
    scores: dict | None = None          # completions with candidates: log-probability of each candidate as the first token


class BackendError(RuntimeError):
    """Every request of a call failed: the server is down, the model is missing..."""


_KIND = re.compile(r"(status \d{3}|timeout|connection|malformed|context)(?=:|$)")
_HTTP = re.compile(r"(?:HTTP|status)\s+(\d{3})\b", re.I)
_TYPE = re.compile(r"([A-Za-z_][\w.]*)(?=:)")
PER_PROMPT = ("context",)               # kinds of failure that are the prompt's own, not the backend's


def error_kind(message: str | None) -> str:
    """The kind of a Generation's `error` (see the module docstring): `status 500`, `timeout`,
    `connection`, `malformed`, `context`, else the exception's type name (`error` if none)."""
    text = (message or "").strip()
    if m := _KIND.match(text):
        return m.group(1)
    if m := _HTTP.match(text):
        return f"status {m.group(1)}"
    m = _TYPE.match(text)
    return m.group(1) if m else "error"


def short(text, n: int = 200) -> str:
    """One line of at most n characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


Schema = dict | None


def per_chat(schema: Schema | list[Schema], n: int, cfg: LLMConfig) -> list[Schema]:
    """One schema (or None) per chat: `schema` is one for the whole call or a list with one per
    chat (a scheduler may batch several roles into one call). Off unless `cfg.structured`."""
    if not cfg.structured or schema is None:
        return [None] * n
    schemas = schema if isinstance(schema, list) else [schema] * n
    if len(schemas) != n:
        raise ValueError(f"{len(schemas)} schemas for {n} chats")
    if cfg.structured_max_chars:
        capped = {}  # one capped copy per schema object
        for s in schemas:
            if s is not None and id(s) not in capped:
                capped[id(s)] = cap_strings(s, cfg.structured_max_chars)
        schemas = [capped[id(s)] if s is not None else None for s in schemas]
    return schemas


def cap_strings(schema, n: int):
    """The schema with every string's maxLength at most n."""
    if isinstance(schema, list):
        return [cap_strings(s, n) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: cap_strings(v, n) for k, v in schema.items()}
    if out.get("type") == "string" and "enum" not in out:
        out["maxLength"] = min(out.get("maxLength", n), n)
        out["minLength"] = min(out.get("minLength", 0), n)
    return out


def with_schema(chat: Chat, schema: Schema) -> Chat:
    """The chat with its answer's schema appended to its last user turn: constrained decoding forces
    the shape, but a model told the shape fills it with what the template asked for."""
    users = [i for i, turn in enumerate(chat) if turn["role"] == "user"]
    if schema is None or not users:
        return chat
    note = ("\n\nWrite the reply above as one JSON object, and nothing else, following this JSON schema:\n"
            + json.dumps(schema, separators=(",", ":")))
    i = users[-1]
    return chat[:i] + [{**chat[i], "content": chat[i]["content"] + note}] + chat[i + 1:]


class Backend:
    calls = 0                           # batched calls made, for the benchmark

    def generate(self, chats: list[Chat], cfg: LLMConfig, schema: Schema | list[Schema] = None) -> list[Generation]:
        """`schema`: the JSON schema of the role's answer (or a list, one per chat); decoding
        follows it only when `cfg.structured` is set (else it is ignored)."""
        raise NotImplementedError

    def complete(self, prompts: list[str], cfg: LLMConfig, candidates: tuple[str, ...] | None = None,
                 special_tokens: bool = True) -> list[Generation]:
        """Raw-text completions, no chat template: the guard classifiers' prompts are whole
        documents, special tokens included, exactly as their model cards write them.
        `special_tokens`: let the tokenizer add its own (BOS) in front, as `tokenizer(prompt)` does;
        False for a prompt that writes its BOS itself. With `candidates` (answer tokens such as
        "Yes"/"No" or "1".."5") each Generation's `scores` holds their log-probabilities as the
        first generated token (a candidate the model does not rank is missing from it)."""
        raise NotImplementedError(f"backend {type(self).__name__} has no raw completions")

    def clip(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """`text` cut to its first `max_tokens` tokens of this model's tokenizer (HarmBench and
        StrongREJECT clip the answer they judge so) -> (text, exact). Without the tokenizer, about
        4 characters a token, and exact is False."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            return (text if len(text) <= 4 * max_tokens else text[:4 * max_tokens]), False
        ids = tokenizer(text, max_length=max_tokens, truncation=True, add_special_tokens=False)["input_ids"]
        return (text if len(ids) < max_tokens else tokenizer.decode(ids)), True


class HFBackend(Backend):
    """Batched transformers generation. The prompts of one step share a long head (the template's
    system turn with the whole policy text, ~90% of an AIDSAFE prompt), so each micro-batch runs
    that shared prefix once and reuses its KV cache for every row: batching then saves prefill,
    not only decoding. Rows are padded between the prefix and their own tokens; positions come
    from the attention mask, so the output equals generating each prompt alone. The KV cache is
    allocated once per batch (a static cache): a growing one is copied whole at every new token,
    which costs more than the decoding itself for batches of long prompts."""

    MIN_SHARED = 16                     # shorter common prefixes are not worth a separate pass
    # Rows are prefilled one by one (`_prefill_rows`) from this context length: 64 rows of a 29M
    # model on 2 CPU cores, prefix 2,500 + 60-90 own tokens: 7.1 s one by one against 11.7 s
    # batched; prefix 140 + 46-76: 3.0 s against 1.8 s (the per-call overhead wins on short rows).
    ROW_PREFILL_FROM = 1024

    def __init__(self, cfg: LLMConfig):
        from .models import load_model, load_tokenizer, stop_token_ids
        self.tokenizer = load_tokenizer(cfg.model)
        self.chat = ChatFormat(self.tokenizer, cfg.model)  # probed once: system turn, alternation, prefill
        self.model = load_model(cfg.model, cfg.load_in_4bit, cfg.dtype, cfg.adapter).eval()
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.context = context_window(self.model.config, self.tokenizer)  # None: unknown, nothing refused
        self._grammars: dict[str, object] = {}  # compiled per schema, for this tokenizer
        self._compiler = None

    def grammar(self, schema: dict):
        """The schema compiled for this tokenizer (xgrammar), once per schema. Compact JSON
        (`any_whitespace=False`): free whitespace lets a weak model pad until its budget."""
        import xgrammar as xgr
        key = json.dumps(schema)  # property order matters: it is the order the answer is written in
        if key not in self._grammars:
            if self._compiler is None:
                # the grammar ends the answer only with a token generate() stops at
                eos = self.model.generation_config.eos_token_id
                stop = sorted(set(eos if isinstance(eos, list) else [eos]) - {None}) or sorted(self.stop_ids)
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                                          stop_token_ids=stop)
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _batch_inputs(self, rows: list[list[int]], share_prefix: bool, max_new_tokens: int) -> dict:
        """input_ids = shared prefix + padding + each row's own tokens, its attention mask, and a
        KV cache sized for the whole generation that already holds the shared prefix of every row."""
        import torch
        from transformers import DynamicCache, StaticCache
        shared = common_prefix_len(rows) if share_prefix and len(rows) > 1 else 0
        if shared < self.MIN_SHARED:
            shared = 0
        width = max(len(r) for r in rows) - shared
        ids = torch.full((len(rows), shared + width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            own = row[shared:]
            ids[i, :shared], mask[i, :shared] = torch.tensor(row[:shared], dtype=torch.long), 1
            ids[i, shared + width - len(own):], mask[i, shared + width - len(own):] = torch.tensor(own, dtype=torch.long), 1
        inputs = {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}
        cache = StaticCache(config=self.model.config, max_cache_len=shared + width + max_new_tokens)
        if shared:
            prefix = DynamicCache(config=self.model.config)
            self.model(input_ids=inputs["input_ids"][:1, :shared], past_key_values=prefix, use_cache=True)
            for i, layer in enumerate(prefix.layers):
                cache.update(layer.keys.expand(len(rows), -1, -1, -1), layer.values.expand(len(rows), -1, -1, -1), i)
            if shared + width >= self.ROW_PREFILL_FROM and all(type(layer).__name__ == "StaticLayer" for layer in cache.layers):
                self._prefill_rows(rows, shared, width, prefix, cache)  # (a sliding-window layer keeps the batched prefill)
        inputs["past_key_values"] = cache
        return inputs

    def _prefill_rows(self, rows: list[list[int]], shared: int, width: int, prefix, cache) -> None:
        """Each row's own tokens but its last, run one row at a time on the shared prefix's cache and
        written into its place in the batch cache: generate() then starts from the last column. A
        padded batch prefill takes the masked attention path, about twice as slow per token on a
        CPU as one row without padding (29M model: 18 s against 9 s for 64 rows of ~250 tokens)."""
        import torch
        heads = [(layer.keys, layer.values) for layer in prefix.layers]
        for r, row in enumerate(rows):
            own = row[shared:-1]
            if not own:
                continue
            start = shared + width - len(own) - 1
            self.model(input_ids=torch.tensor([own], dtype=torch.long, device=self.model.device), past_key_values=prefix,
                       use_cache=True, logits_to_keep=1)  # only the cache is wanted, not 2,000-wide logits per token
            for layer, target, (keys, values) in zip(prefix.layers, cache.layers, heads):
                target.keys[r, :, start:start + len(own)] = layer.keys[0, :, shared:]
                target.values[r, :, start:start + len(own)] = layer.values[0, :, shared:]
                layer.keys, layer.values = keys, values  # back to the prefix alone for the next row
        for target in cache.layers:
            target.cumulative_length.fill_(shared + width - 1)

    def generate(self, chats, cfg, schema=None):
        self.calls += 1
        schemas = per_chat(schema, len(chats), cfg)
        ids = self.chat.prompt_ids([with_schema(c, s) for c, s in zip(chats, schemas)])
        return self._generate_ids(ids, cfg, grammars=[self.grammar(s) if s else None for s in schemas],
                                  decode=self.chat.completion)

    def complete(self, prompts, cfg, candidates=None, special_tokens=True):
        self.calls += 1
        ids = [self.tokenizer(p, add_special_tokens=special_tokens)["input_ids"] for p in prompts]
        return self._generate_ids(ids, cfg, wanted={c: candidate_id(self.tokenizer, c) for c in candidates or ()})

    def _generate_ids(self, ids: list[list[int]], cfg: LLMConfig, grammars: list | None = None, wanted: dict | None = None,
                      decode=lambda text: text) -> list[Generation]:
        """Prompt token ids -> Generations, longest first in micro-batches of `cfg.batch_size`. A row
        past the context window is not generated (its own failure); `grammars` keep each row inside
        its schema; with `wanted` ({candidate: token id}) each Generation's `scores` holds their
        log-probabilities as the first token; `decode` gives a chat's completion its reasoning back."""
        import torch
        results: list[Generation | None] = [None] * len(ids)
        for i, row in enumerate(ids):
            if self.context and len(row) + cfg.max_new_tokens > self.context:
                results[i] = Generation("", 0, error=f"context: prompt of {len(row)} tokens + {cfg.max_new_tokens} new "
                                                     f"> {self.context}")
        # Longest first, so each micro-batch holds similar lengths and pads little.
        order = sorted((i for i in range(len(ids)) if results[i] is None), key=lambda i: -len(ids[i]))
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=len(ids), desc="  generate", leave=False, disable=len(ids) <= cfg.batch_size)
        for idx in batched(order, cfg.batch_size):
            with torch.inference_mode():
                inputs = self._batch_inputs([ids[i] for i in idx], cfg.share_prefix, cfg.max_new_tokens)
                rows = [grammars[i] for i in idx] if grammars else []
                if any(rows):
                    inputs["logits_processor"] = [GrammarMask(rows, self.model.config.vocab_size)]
                out = self.model.generate(
                    **inputs, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                    temperature=cfg.temperature if cfg.temperature > 0 else None,
                    top_p=cfg.top_p if cfg.temperature > 0 else None, pad_token_id=pad,
                    disable_compile=True,  # a static cache would make transformers compile on a GPU: not worth it per batch
                    output_logits=bool(wanted), return_dict_in_generate=True)
            new = out.sequences[:, inputs["input_ids"].shape[1]:]
            first = torch.log_softmax(out.logits[0].float(), dim=-1) if wanted else None  # the raw logits, before sampling
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            counts = (new != pad).sum(dim=1).tolist()
            for r, (i, text, n, row) in enumerate(zip(idx, texts, counts, new.tolist())):
                stopped = any(t in self.stop_ids for t in row)
                # a scored answer is one position read, never a reply cut short
                results[i] = Generation(decode(text).strip(), int(n), truncated=not stopped and not wanted,
                                        scores={c: float(first[r, t]) for c, t in wanted.items() if t is not None}
                                        if wanted else None)
            bar.update(len(idx))
        bar.close()
        return results


def candidate_id(tokenizer, text: str) -> int | None:
    """The one token `text` is, as the classifiers' own code looks it up (`tokenizer.vocab["Yes"]`),
    else the first token it encodes to; None if it has none."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return vocab[text]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if ids else None


class GrammarMask:
    """A transformers logits processor that keeps each row of a batch inside its own grammar
    (None: unconstrained), as xgr.contrib.hf.LogitsProcessor does, but with rows that have no
    grammar and without asserting on a token the grammar cannot take (the row is then left
    unconstrained: its text fails to parse and is counted, the batch goes on). One per generate()
    call: it follows the batch token by token."""

    def __init__(self, grammars: list, vocab_size: int):
        import xgrammar as xgr
        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:  # the token sampled after the previous call
            for i, m in enumerate(self.matchers):
                if m is not None and not m.is_terminated() and not m.accept_token(int(input_ids[i, -1])):
                    self.matchers[i] = None
        self.started = True
        rows = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        if rows:
            masked = scores if scores.device.type in ("cpu", "cuda") else scores.cpu()
            self.xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(masked.device), indices=rows)
            scores = masked.to(scores.device)
        return scores


SANE_CONTEXT = 10**8                    # a tokenizer that does not know its length says 1e30


def context_window(config, tokenizer) -> int | None:
    """The model's context in tokens: the smaller of its config's max_position_embeddings and its
    tokenizer's model_max_length, of those that are known and sane; None if neither is."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    known = [n for n in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
             if isinstance(n, int) and not isinstance(n, bool) and 0 < n < SANE_CONTEXT]
    return min(known) if known else None


def common_prefix_len(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (generation
    needs a fresh token to start from)."""
    n, limit = 0, min(len(r) for r in rows) - 1
    first = rows[0]
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


TOP_LOGPROBS = 20                       # openai completions: alternatives per position (OpenAI's maximum, vLLM's default cap)


class OpenAIBackend(Backend):
    def __init__(self, cfg: LLMConfig):
        import openai
        self.openai = openai
        self.client = openai.OpenAI(
            base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "not-needed",
            timeout=cfg.timeout_s, max_retries=cfg.max_retries)
        self.model = cfg.model

    def _one(self, chat: Chat, cfg: LLMConfig, schema: Schema = None) -> Generation:
        try:
            chat = with_schema(chat, schema)
            try:
                r = self._create(chat, cfg, schema)
            except self.openai.BadRequestError as e:
                # A server whose template has no system role or needs strict alternation (Mistral
                # v0.1/v0.2 served by vLLM) refuses the chat: send what such a template can express.
                if not re.search(r"system|alternate", str(e), re.I):
                    raise
                r = self._create(merge_runs(fold_system(chat)), cfg, schema)
            choice = r.choices[0]
            text = choice.message.content or ""
            # Servers with a reasoning parser (vLLM --reasoning-parser, Ollama) return the reasoning apart.
            reasoning = getattr(choice.message, "reasoning_content", None) or getattr(choice.message, "reasoning", None)
            if isinstance(reasoning, str) and reasoning.strip():
                text = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{text}"
            tokens = r.usage.completion_tokens if getattr(r, "usage", None) else 0
            return Generation(text.strip(), tokens, truncated=choice.finish_reason == "length")
        except (self.openai.OpenAIError, ValueError, AttributeError, IndexError, TypeError) as e:
            # HTTP errors and timeouts after retries, and bodies that are not a chat completion.
            return Generation("", 0, error=self.failure(e))

    def failure(self, e: Exception) -> str:
        """`<kind>: <exception type>: <what it said>`, one short line (error_kind reads the kind)."""
        o, detail = self.openai, str(e)
        if isinstance(e, o.APIStatusError):
            body = e.body if isinstance(e.body, dict) else {}
            kind, detail = f"status {e.status_code}", body.get("message") or e.message
        elif isinstance(e, o.APITimeoutError):
            kind = "timeout"
        elif isinstance(e, o.APIConnectionError):
            kind, detail = "connection", f"{e} ({e.__cause__})" if e.__cause__ else str(e)
        elif isinstance(e, (o.APIResponseValidationError, ValueError, AttributeError, IndexError, TypeError)):
            kind = "malformed"  # the reply is no chat completion
        else:
            return f"{type(e).__name__}: {short(detail)}"
        return f"{kind}: {type(e).__name__}: {short(detail)}"

    def _create(self, chat: Chat, cfg: LLMConfig, schema: Schema = None):
        extra = {}
        if schema is not None:  # OpenAI's structured outputs; vLLM serve, llama.cpp server and Ollama read it too
            extra["response_format"] = {"type": "json_schema", "json_schema": {
                "name": re.sub(r"[^A-Za-z0-9_-]", "_", schema.get("title", "answer")), "schema": schema, "strict": True}}
        return self.client.chat.completions.create(
            model=self.model, messages=chat, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
            **extra)

    def _complete_one(self, prompt: str, cfg: LLMConfig, candidates, special_tokens: bool) -> Generation:
        try:
            extra = {"logprobs": TOP_LOGPROBS} if candidates else {}
            # vLLM's completions take `add_special_tokens` (default true: a BOS in front)
            body = {} if special_tokens else {"add_special_tokens": False}
            r = self.client.completions.create(model=self.model, prompt=prompt, temperature=cfg.temperature,
                                               top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, extra_body=body or None,
                                               **extra)
            choice = r.choices[0]
            scores = None
            if candidates:
                top = (choice.logprobs.top_logprobs or [{}])[0] if choice.logprobs else {}
                scores = {c: float(top[c]) for c in candidates if c in (top or {})}
            tokens = r.usage.completion_tokens if getattr(r, "usage", None) else 0
            return Generation((choice.text or "").strip(), tokens, truncated=choice.finish_reason == "length" and not candidates,
                              scores=scores)
        except (self.openai.OpenAIError, ValueError, AttributeError, IndexError, TypeError, KeyError) as e:
            return Generation("", 0, error=self.failure(e))

    def complete(self, prompts, cfg, candidates=None, special_tokens=True):
        self.calls += 1
        with ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrency)) as pool:
            futures = [pool.submit(self._complete_one, p, cfg, candidates, special_tokens) for p in prompts]
            return [f.result() for f in futures]

    def clip(self, text, max_tokens):
        # the served model's tokenizer where it can be read without the Hub (a local folder, the HF cache)
        if not hasattr(self, "tokenizer"):
            try:
                from transformers import AutoTokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(self.model, local_files_only=True)
            except Exception:  # noqa: BLE001 - any failure means: no tokenizer here
                self.tokenizer = None
        return super().clip(text, max_tokens)

    def generate(self, chats, cfg, schema=None):
        self.calls += 1
        schemas = per_chat(schema, len(chats), cfg)
        with ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrency)) as pool:
            futures = [pool.submit(self._one, c, cfg, s) for c, s in zip(chats, schemas)]
            return [f.result() for f in tqdm(futures, desc="  requests", leave=False, disable=len(chats) < 8)]


class VLLMBackend(Backend):
    def __init__(self, cfg: LLMConfig):
        try:
            from vllm import LLM
        except ImportError:
            raise BackendError("backend 'vllm' needs vLLM: pip install vllm (GPU machines only)") from None
        from .models import resolve_model
        self.llm = LLM(model=resolve_model(cfg.model), enable_lora=bool(cfg.adapter),
                       quantization="bitsandbytes" if cfg.load_in_4bit else None,
                       dtype="auto" if cfg.dtype == "auto" else cfg.dtype)
        self.chat = ChatFormat(self.llm.get_tokenizer(), cfg.model)
        self.adapter = cfg.adapter

    def generate(self, chats, cfg, schema=None):
        from vllm import SamplingParams
        self.calls += 1
        lora = None
        if self.adapter:
            from vllm.lora.request import LoRARequest
            lora = LoRARequest("adapter", 1, self.adapter)
        schemas = per_chat(schema, len(chats), cfg)
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                 **vllm_structured(s)) for s in schemas]
        outs = self.llm.chat([self.chat.adapt(with_schema(c, s)) for c, s in zip(chats, schemas)], params, use_tqdm=len(chats) > 8, lora_request=lora)
        return [Generation(self.chat.completion(o.outputs[0].text).strip(), len(o.outputs[0].token_ids),
                           truncated=o.outputs[0].finish_reason == "length") for o in outs]


def vllm_structured(schema: Schema) -> dict:
    """vLLM's structured-output sampling parameter for a JSON schema: `structured_outputs`
    (StructuredOutputsParams, vLLM >= 0.10.2; the only one from 0.12) or the older
    `guided_decoding` (GuidedDecodingParams)."""
    if schema is None:
        return {}
    try:
        from vllm.sampling_params import StructuredOutputsParams
        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams
        return {"guided_decoding": GuidedDecodingParams(json=schema)}


BACKENDS: dict[str, Callable[[LLMConfig], Backend]] = {
    "hf": HFBackend, "openai": OpenAIBackend, "vllm": VLLMBackend,
}
_LOADED: dict[tuple, Backend] = {}


def get_backend(cfg: LLMConfig) -> Backend:
    """One loaded backend per (backend, model, weights) so roles sharing a model share its memory.
    The openai client's settings are fixed when it is built, so they are part of the key too."""
    key = (cfg.backend, cfg.model, cfg.adapter, cfg.load_in_4bit, cfg.dtype,
           cfg.base_url, cfg.api_key_env, cfg.timeout_s, cfg.max_retries)
    if key not in _LOADED:
        _LOADED[key] = BACKENDS[cfg.backend](cfg)
    return _LOADED[key]


def release_backends() -> None:
    """Forget loaded models (tests, and stages that load a model of their own for training): no
    Agent keeps a reference of its own, so their memory is freed and the next use loads again."""
    _LOADED.clear()


class Agent:
    """A role in the method (intent decomposer, deliberator, judge...) bound to an LLM. Its model
    loads when the agent is made (a missing model stops the stage before anything runs), or with
    `lazy` at its first request: stage 5 makes every judge up front, but loads a judge that runs
    in-process only once the models under test are released, and one judge at a time."""

    def __init__(self, role: str, cfg: LLMConfig, lazy: bool = False):
        self.role, self.cfg = role, cfg
        self.label = f"{cfg.backend}:{cfg.model}"
        if not lazy:
            get_backend(cfg)

    @property
    def backend(self) -> Backend:
        return get_backend(self.cfg)

    def __call__(self, chats: list[Chat], schema: dict | None = None) -> list[Generation]:
        """`schema`: the JSON schema of this role's answer (Template.schema), or one per chat; the
        backend constrains decoding with it when `cfg.structured` is set."""
        if not chats:
            return []
        return self._checked(self.backend.generate(chats, self.cfg, schema=schema))

    def complete(self, prompts: list[str], candidates: tuple[str, ...] | None = None,
                 special_tokens: bool = True) -> list[Generation]:
        """Raw-text completions (Backend.complete): the guard classifiers' prompts."""
        if not prompts:
            return []
        return self._checked(self.backend.complete(prompts, self.cfg, candidates, special_tokens))

    def _checked(self, gens: list[Generation]) -> list[Generation]:
        if all(g.error for g in gens) and not all(error_kind(g.error) in PER_PROMPT for g in gens):
            raise BackendError(f"{self.role} ({self.label}): all {len(gens)} requests failed; first: {gens[0].error}")
        return gens

