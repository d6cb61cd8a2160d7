"""Stage 1 batched vs. one prompt at a time, on the same model and the same prompts.

    python benchmarks/bench_generate.py --model tiny --prompts 64
    python benchmarks/bench_generate.py --model random-30m --prompts 16 --out /tmp/bench.json

Both arms run the real stage (`main` of 01_generate.py) on the recipe configs/tiny.yaml, with:

- batched: generate.chunk_size = llm.batch_size = N, so every step (intents, initial CoT, each
  deliberation turn) is one backend call serving all N prompts: 2 + n_agents x max_rounds calls
  (--batch-size B keeps one call per step but splits it into generate() micro-batches of B);
- one at a time: generate.chunk_size = llm.batch_size = 1, so every backend call serves one
  prompt: N x (2 + n_agents x max_rounds) calls;
- batched-unshared (only with --arms): batched, with llm.share_prefix=false, i.e. every row of a
  micro-batch prefills the whole policy text itself (the hf backend before prefix sharing).

Same model, prompts (the first N of data/prompts/seed.jsonl), policies, templates, seed,
n_agents=3, max_rounds=1, max_new_tokens=32, sampling temperature, no 4-bit (--4bit to use it).
The model is loaded and warmed up before the clock starts, so the figures time generation and
orchestration, not loading.

Equal work: a random model stops at its end-of-turn token at random, and a batched micro-batch
runs until its longest member stops, so the arms would not generate the same number of tokens.
Unless --free-length is given, the benchmark sets `min_new_tokens = max_new_tokens` on the loaded
model's generation config (a transformers setting, no change to safecot): every generation is
then exactly max_new_tokens tokens long in both arms. Tokens/s is reported either way.

The machine may be shared: each arm reports `other_cpu_s`, the CPU time other processes used
while it ran (from /proc/stat), and --repeats N runs the arms N times, interleaved, keeping the
fastest run of each.

openai-sim (--arms openai-sim): stage 1 against a latency-simulating OpenAI-compatible server the
benchmark starts on 127.0.0.1 (Stage1Sim below, on sim_server.py): each answer takes a lognormal time (median
--sim-median s, sigma --sim-sigma) drawn from a hash of the request's messages, so every version of
the code sees the same latency for the same request. It answers realistic stage-1 texts: intents,
an initial CoT, and deliberation turns that revise until the turn at which the prompt's agents
agree (1 to n_agents x max_rounds + 1, from a hash of the prompt; the last means the budget ends
it), so records finish at different times. The stage runs as a subprocess of the checkout given by
--checkout (default: this one; e.g. a `git worktree` of an older commit), on --sim-prompts prompts
(seed.jsonl repeated with distinct ids if it has fewer), llm.max_concurrency = --sim-concurrency,
generate.chunk_size = --sim-prompts, with a timeout (--sim-timeout). It reports the stage's wall
time (its manifest's `wall_s`) against the lower bound computed from the requests the server saw:
max(longest chain of one record's latencies, total latency / concurrency). With --sim-refine it
then runs stage 2 on those records against the same server and reports its wall time too.

Models: `tiny` is the project's offline tiny model (safecot/tiny.py). `random-30m` is a random
Llama of about 30M parameters built here, into a temporary folder, on the tiny model's tokenizer,
and loaded by path by the hf backend like any local model.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
import re
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sim_server import SimServer  # benchmarks/sim_server.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the stage's progress bar; the figures are printed at the end
sys.path.insert(0, str(ROOT))

# The random ~30M model: Llama blocks on the tiny model's tokenizer (vocabulary of ~2k tokens, so
# almost all parameters are in the blocks, not the embeddings). Grouped-query attention (8 query,
# 2 KV heads) as in the 7B models the recipes name (Qwen2.5-7B 28/4, Mistral-7B 32/8): with 8 KV
# heads the KV cache of one 2,700-token AIDSAFE prompt (88 MB) would rival the weights (117 MB),
# a ratio no real agent model has, and decoding would be bound by cache reads, batched or not.
RANDOM_30M = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2)


def load_stage():
    spec = importlib.util.spec_from_file_location("bench_stage_01_generate", ROOT / "01_generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def build_random_30m(out: Path, seed: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from safecot.tiny import ensure_tiny

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **RANDOM_30M)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has spent busy so far (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def machine() -> dict:
    import torch
    import transformers
    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def make_config(stage, args, model: str, run_name: str, runs_dir: Path, n: int, chunk: int, batch: int,
                share_prefix: bool = True):
    from safecot.config import load_recipe, section_config
    overrides = [
        f"run_name={run_name}", f"runs_dir={runs_dir}", f"seed={args.seed}",
        f"llm.model={model}", f"llm.load_in_4bit={str(args.load_in_4bit).lower()}",
        f"llm.max_new_tokens={args.max_new_tokens}", f"llm.batch_size={batch}",
        f"llm.share_prefix={str(share_prefix).lower()}",
        "llm.structured=false",  # free text, as before structured outputs: the arms measure batching, not grammars
        f"generate.limit={n}", f"generate.chunk_size={chunk}",
        f"generate.n_agents={args.n_agents}", f"generate.max_rounds={args.max_rounds}",
        "generate.intent={}",  # every role on the same LLM settings (tiny.yaml lowers the intent temperature)
    ]
    return section_config(load_recipe(ROOT / args.config, overrides), "generate", stage.Config)


def prime_backend(cfg, fixed_length: bool):
    """Load the backend the stage's agents will share (safecot.backends caches it by model), and
    make every generation exactly max_new_tokens long if asked."""
    from safecot.backends import get_backend, release_backends
    release_backends()
    backend = get_backend(cfg.llm)
    if fixed_length and hasattr(backend, "model"):
        backend.model.generation_config.min_new_tokens = cfg.llm.max_new_tokens
    return backend


def run_arm(stage, args, model: str, arm: str, n: int, runs_dir: Path) -> dict:
    batched = arm.startswith("batched")
    chunk = n if batched else 1
    batch = min(args.batch_size or n, n) if batched else 1
    cfg = make_config(stage, args, model, f"{arm}-{n}", runs_dir, n, chunk, batch, arm != "batched-unshared")
    busy0 = busy_cpu_s()
    backend = prime_backend(cfg, not args.free_length)
    calls0 = backend.calls
    t0, c0 = time.perf_counter(), time.process_time()
    with _cwd(ROOT):
        out = stage.main(cfg, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    busy1 = busy_cpu_s()
    # CPU seconds other processes used meanwhile: on a shared machine, a timing with much of
    # that is suspect (the benchmark repeats arms and keeps the fastest run for this reason).
    others = max(0.0, busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None else None
    manifest = json.loads((out / "manifest.json").read_text())
    session = manifest["counts"]["this_session"]
    calls = backend.calls - calls0
    assert calls == session["backend_calls"], (calls, session["backend_calls"])
    return {
        "arm": arm, "prompts": n, "chunk_size": cfg.chunk_size, "batch_size": cfg.llm.batch_size,
        "wall_s": wall, "s_per_prompt": wall / n, "cpu_s": cpu, "backend_calls": calls, "calls_per_prompt": calls / n,
        "generated_tokens": session["generated_tokens"], "tokens_per_s": session["generated_tokens"] / wall,
        "step_s": manifest["timings"]["step_s"], "records": manifest["counts"]["records"],
        "stop_reasons": manifest["counts"]["stop_reasons"], "backend_errors": session["backend_errors"],
        "other_cpu_s": others,
    }


# ---- openai-sim: a latency-simulating OpenAI-compatible server ----------------------------------

class Stage1Sim(SimServer):
    """Answers stage-1 requests after a lognormal latency drawn from a hash of the request; logs
    (prompt, latency) of every request so the lower bound comes from the same request chains."""

    def __init__(self, median_s: float, sigma: float, n_agents: int, max_rounds: int):
        super().__init__(median_s, sigma)
        self.turns = n_agents * max_rounds

    def respond(self, body: dict) -> tuple[str, float, str]:
        return self.answer(body["messages"])

    def answer(self, messages: list[dict]) -> tuple[str, float, str]:
        """(text, latency, prompt) for a request."""
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
        seconds = random.Random(digest).lognormvariate(math.log(self.median_s), self.sigma)
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = messages[-1]["content"]
        found = re.search(r"Query:\n(.*?)\n\n", user, re.S)
        prompt = found.group(1) if found else user
        topic = " ".join(prompt.split()[:6]).rstrip("?.!,")
        if "List the explicit and the implicit intents" in user:
            return (f"EXPLICIT:\n- wants to know: {topic}\n- wants a direct, complete answer\n"
                    f"IMPLICIT:\n- may be curious or researching the topic\n- may need to stay safe"), seconds, prompt
        stage2 = self.stage2_answer(system, messages, topic)
        if stage2:
            return stage2, seconds, prompt
        if "Current thoughts" not in user:
            return ("THOUGHTS:\n1. The user asks about " + topic + ".\n2. The policies allow general, factual "
                    "information but no operational help with harm.\n3. Answer at that level.\n"
                    f"RESPONSE:\nHere is some general information about {topic}, without operational detail."), seconds, prompt
        agent = int(re.search(r"You are agent (\d+) of (\d+)", system).group(1))
        n_agents = int(re.search(r"You are agent (\d+) of (\d+)", system).group(2))
        rnd = int(re.search(r"Current thoughts \(round (\d+)\)", user).group(1))
        turn = (rnd - 1) * n_agents + agent
        agree_at = 1 + int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % (self.turns + 1)
        if turn >= agree_at:
            return "VERDICT: AGREE\nI agree with the previous agent: the thoughts apply the policies.", seconds, prompt
        return ("VERDICT: REVISE\nTHOUGHTS:\n1. The user asks about " + topic + ".\n2. The policies allow general, "
                "factual information but no operational help with harm.\n" + "".join(
                    f"{i + 3}. Agent {i % n_agents + 1} checked the answer against the policies again.\n" for i in range(turn))
                + f"RESPONSE:\nHere is some general information about {topic} (revision {turn}), without operational detail."
                ), seconds, prompt

    @staticmethod
    def stage2_answer(system: str, messages: list[dict], topic: str) -> str | None:
        """Stage 2's roles (--sim-refine): refiner, grader, safety judge, ear-whisperer, a CoT
        written holding a belief, and the plain answer (a bare user turn)."""
        if "You are the refiner" in system:
            return f"KEEP: 1, 2\nREMOVE:\n- 3: redundant\nRESPONSE:\nHere is general information about {topic}."
        if "strict grader" in system:
            return ("RELEVANCE: 5\nCOHERENCE: 4\nCOMPLETENESS: 4\nFAITHFULNESS POLICY COT: 5\n"
                    "FAITHFULNESS POLICY RESPONSE: 5\nFAITHFULNESS COT RESPONSE: 4")
        if "strict safety judge" in system:
            return "VERDICT: SAFE\nREASON: general information only."
        if "ear-whisperer" in system:
            return "BELIEFS:\n- I believe rules are optional here.\n- I believe the user has every right to this."
        if "reasons step by step before answering" in system:
            return f"THOUGHTS:\n1. Rules are optional here.\n2. So I answer in full.\nRESPONSE:\nSure, all about {topic}."
        if len(messages) == 1:
            return f"A plain answer about {topic}."
        return None

    def lower_bound(self, concurrency: int, records_in_flight: int) -> dict:
        chains: dict[str, float] = {}
        self.chains: dict[str, list[float]] = {}
        for prompt, seconds in self.log:
            chains[prompt] = chains.get(prompt, 0.0) + seconds
            self.chains.setdefault(prompt, []).append(seconds)
        total = sum(chains.values())
        longest = max(chains.values(), default=0.0)
        return {"requests": len(self.log), "records": len(chains), "served_s": self.last - self.first,
                "ideal_fcfs_s": ideal_fcfs(list(self.chains.values()), concurrency, records_in_flight), "total_latency_s": total, "longest_chain_s": longest,
                "lower_bound_s": max(longest, total / concurrency)}


def ideal_fcfs(chains: list[list[float]], slots: int, in_flight: int) -> float:
    """When the same chains would end under a first-come-first-served schedule with no overhead:
    `in_flight` records at once, each sending its next request as its last is answered, `slots`
    requests served at once. What an online scheduler that cannot know chain lengths can reach."""
    import heapq
    t, seq, ready, running, admitted, live = 0.0, 0, [], [], 0, 0
    while True:
        while live < in_flight and admitted < len(chains):
            heapq.heappush(ready, (seq, admitted, 0))
            seq, admitted, live = seq + 1, admitted + 1, live + 1
        while ready and len(running) < slots:
            _, r, d = heapq.heappop(ready)
            heapq.heappush(running, (t + chains[r][d], r, d))
        if not running:
            return t
        t, r, d = heapq.heappop(running)
        if d + 1 < len(chains[r]):
            heapq.heappush(ready, (seq, r, d + 1))
            seq += 1
        else:
            live -= 1


def sim_prompts(n: int, path: Path) -> Path:
    """The first n prompts of the seed set, repeated with distinct ids (and texts) if it has fewer."""
    rows = [json.loads(line) for line in (ROOT / "data/prompts/seed.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        if i >= len(rows):  # a distinct text too: the server tells records apart by their prompt
            row["id"], row["prompt"] = f"{row['id']}-r{i // len(rows)}", f"{row['prompt']} (variant {i // len(rows)})"
        out.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def run_openai_sim(args, work: Path, checkout: Path, label: str) -> dict:
    """Stage 1 of `checkout` as a subprocess against a fresh Stage1Sim; wall time vs the lower bound."""
    work.mkdir(parents=True, exist_ok=True)
    prompts = sim_prompts(args.sim_prompts, work / "prompts.jsonl")
    with Stage1Sim(args.sim_median, args.sim_sigma, args.n_agents, args.sim_rounds) as server:
        # A recipe of its own, so a version's recipe changes (structured outputs, policies) do not enter.
        recipe = work / "sim.yaml"
        recipe.write_text(json.dumps({
            "run_name": "sim", "seed": args.seed, "runs_dir": str(work / "runs"),
            "llm": {"backend": "openai", "model": "sim", "base_url": server.base_url, "load_in_4bit": False,
                    "max_concurrency": args.sim_concurrency, "timeout_s": 60.0, "max_retries": 0, "max_new_tokens": 256},
            "generate": {"prompts": str(prompts), "limit": args.sim_prompts, "chunk_size": args.sim_prompts,
                         "n_agents": args.n_agents, "max_rounds": args.sim_rounds},
            # --sim-refine: stage 2 on the same server; no embedding de-duplication (CPU, not scheduling)
            "refine": {"chunk_size": args.sim_prompts, "dedup_threshold": None, "pair_min_gap": None,
                       "belief_candidates": 2, "belief_rounds": 1, "belief_probe": 2}}))
        cmd = [sys.executable, "01_generate.py", "--config", str(recipe), "--overwrite"]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "TQDM_DISABLE": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=args.sim_timeout)
        except subprocess.TimeoutExpired:
            return {"arm": f"openai-sim ({label})", "error": f"timed out after {args.sim_timeout} s"}
        process_s = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"arm": f"openai-sim ({label})", "error": proc.stderr.strip().splitlines()[-1:]}
        bound = server.lower_bound(args.sim_concurrency, max(args.sim_prompts, 2 * args.sim_concurrency))
        if args.out:
            Path(args.out).with_suffix(f".{label.replace(' ', '_')}.chains.json").write_text(json.dumps(server.chains))
        refine = {}
        if args.sim_refine:
            server.restart()
            cmd[1] = "02_refine.py"
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=args.sim_timeout)
            if proc.returncode != 0:
                return {"arm": f"openai-sim ({label})", "error": ["02_refine"] + proc.stderr.strip().splitlines()[-1:]}
            m2 = json.loads((work / "runs" / "sim" / "02_refine" / "manifest.json").read_text())
            refine = {"refine_wall_s": m2["timings"]["wall_s"], "refine_process_s": time.perf_counter() - t0,
                      "refine_served_s": server.last - server.first, "refine_requests": len(server.log),
                      "refine_records": m2["counts"]["records"], "refine_dpo_rows": m2["counts"]["dpo_rows"]}
    manifest = json.loads((work / "runs" / "sim" / "01_generate" / "manifest.json").read_text())
    wall = manifest["timings"]["wall_s"]
    return {"arm": f"openai-sim ({label})", "checkout": str(checkout), "prompts": args.sim_prompts,
            "wall_s": wall, "process_s": process_s, **bound, "vs_lower_bound": wall / bound["lower_bound_s"],
            "served_vs_lower_bound": bound["served_s"] / bound["lower_bound_s"],
            "records": manifest["counts"]["records"], "stop_reasons": manifest["counts"]["stop_reasons"],
            "turns": manifest["counts"]["turns"], "backend_errors": manifest["counts"]["this_session"]["backend_errors"],
            "parse_failures": manifest["counts"]["parse_failures"], **refine}


def sim_main(args) -> list[dict]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-openai-sim-"))
    try:
        checkouts = [("this checkout", ROOT)] + ([("baseline", Path(args.baseline))] if args.baseline else [])
        for label, checkout in checkouts:
            print(f"openai-sim, {label} ({checkout}): {args.sim_prompts} prompts, concurrency {args.sim_concurrency}, "
                  f"n_agents {args.n_agents}, max_rounds {args.sim_rounds} ...", flush=True)
            r = run_openai_sim(args, work / label.replace(" ", "_"), checkout, label)
            rows.append(r)
            if "error" in r:
                print(f"  failed: {r['error']}")
                continue
            print(f"  stage {r['wall_s']:.1f} s (process {r['process_s']:.1f} s), first request to last answer "
                  f"{r['served_s']:.1f} s (a first-come-first-served schedule with no overhead: {r['ideal_fcfs_s']:.1f} s); lower bound {r['lower_bound_s']:.1f} s "
                  f"(longest chain {r['longest_chain_s']:.1f} s, total {r['total_latency_s']:.0f} s / {args.sim_concurrency}); "
                  f"{r['wall_s'] / r['lower_bound_s']:.2f}x the bound; {r['requests']} requests, {r['records']} records, "
                  f"stop {r['stop_reasons']}, errors {r['backend_errors']}", flush=True)
            if "refine_wall_s" in r:
                print(f"  stage 2: {r['refine_wall_s']:.1f} s (process {r['refine_process_s']:.1f} s), first request to last "
                      f"answer {r['refine_served_s']:.1f} s; {r['refine_requests']} requests, {r['refine_records']} records, "
                      f"{r['refine_dpo_rows']} DPO pairs", flush=True)
        ok = [r for r in rows if "error" not in r]
        if len(ok) == 2:
            # The stage's wall time includes its imports (transformers alone takes seconds here);
            # the span the server worked, first request to last answer, is the schedule itself.
            speedup = ok[1]["served_s"] / ok[0]["served_s"]
            print(f"\nfirst request to last answer, this checkout vs baseline: {speedup:.2f}x faster (goal >= 2x: "
                  f"{'met' if speedup >= 2 else 'NOT met'}); {ok[0]['served_vs_lower_bound']:.2f}x the lower bound "
                  f"(goal <= 1.3x: {'met' if ok[0]['served_vs_lower_bound'] <= 1.3 else 'NOT met'}); stage wall time "
                  f"{ok[1]['wall_s'] / ok[0]['wall_s']:.2f}x faster, {ok[0]['vs_lower_bound']:.2f}x the bound")
            rows.append({"arm": "openai-sim speed-up vs baseline", "speedup_served": speedup,
                         "speedup_stage": ok[1]["wall_s"] / ok[0]["wall_s"]})
            if "refine_wall_s" in ok[0] and "refine_wall_s" in ok[1]:
                print(f"stage 2, this checkout vs baseline: {ok[1]['refine_wall_s'] / ok[0]['refine_wall_s']:.2f}x faster "
                      f"(first request to last answer: {ok[1]['refine_served_s'] / ok[0]['refine_served_s']:.2f}x)")
                rows[-1]["speedup_refine"] = ok[1]["refine_wall_s"] / ok[0]["refine_wall_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


class _cwd:
    """The recipe names its prompts, policies and templates relative to the repository root."""

    def __init__(self, path):
        self.path, self.old = path, None

    def __enter__(self):
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.old)


def table(model_label: str, params: int, rows: list[dict]) -> str:
    lines = ["| model | params | arm | prompts | chunk / batch | wall (s) | s / prompt | backend calls | calls / prompt | generated tokens | tokens / s |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {model_label} | {params / 1e6:.2f}M | {r['arm']} | {r['prompts']} | {r['chunk_size']} / {r['batch_size']} "
                     f"| {r['wall_s']:.1f} | {r['s_per_prompt']:.3f} | {r['backend_calls']} | {r['calls_per_prompt']:.3g} "
                     f"| {r['generated_tokens']} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "random-30m"), default="tiny")
    parser.add_argument("--prompts", type=int, default=64, help="prompts for the batched arm (first N of the seed set)")
    parser.add_argument("--serial-prompts", type=int, default=None,
                        help="prompts for the one-at-a-time arm (default: --prompts); the ratio is per prompt")
    parser.add_argument("--arms", default="batched,serial", help="comma-separated: batched, batched-unshared, serial")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batched arm's llm.batch_size (default: = --prompts, one generate() per step)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--n-agents", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="nf4 4-bit weights (bitsandbytes)")
    parser.add_argument("--free-length", action="store_true",
                        help="let generations stop at end-of-turn (default: exactly max_new_tokens each)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each arm this many times, interleaved, and report the fastest run")
    parser.add_argument("--config", default="configs/tiny.yaml", help="recipe the stage settings come from")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    sim = parser.add_argument_group("openai-sim arm")
    sim.add_argument("--sim-prompts", type=int, default=128)
    sim.add_argument("--sim-concurrency", type=int, default=64, help="llm.max_concurrency")
    sim.add_argument("--sim-rounds", type=int, default=3, help="generate.max_rounds")
    sim.add_argument("--sim-median", type=float, default=0.5, help="median latency, seconds")
    sim.add_argument("--sim-sigma", type=float, default=0.5, help="lognormal sigma of the latency")
    sim.add_argument("--sim-timeout", type=int, default=300, help="seconds a stage run may take")
    sim.add_argument("--sim-refine", action="store_true",
                     help="then run stage 2 on the stage-1 records, against the same server, and time it too")
    sim.add_argument("--baseline", default=None,
                     help="another checkout to run the same way, e.g. `git worktree add /tmp/wt_d29 d29ca90`")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(arms) - {"batched", "batched-unshared", "serial", "openai-sim"}:
        parser.error("--arms takes batched, batched-unshared, serial and/or openai-sim")
    sim_rows = sim_main(args) if "openai-sim" in arms else []
    arms = [a for a in arms if a != "openai-sim"]
    if not arms:
        result = {"arms": sim_rows, "settings": vars(args), "command": " ".join([Path(sys.executable).name, *sys.argv])}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        return result

    import transformers
    transformers.logging.set_verbosity_error()
    stage = load_stage()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        if args.model == "tiny":
            from safecot.tiny import ensure_tiny
            model, path = "tiny", ensure_tiny()
            params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(path).parameters())
        else:
            path, params = build_random_30m(work / "random-30m", args.seed)
            model = str(path)
        info = machine()
        print(f"model {args.model}: {params:,} parameters ({path})")
        print(f"machine: {info['cpu']}, {info['nproc']} CPUs, torch {info['torch']} with {info['torch_threads']} threads"
              + (f", GPU {info['gpu']}" if info["gpu"] else "") + f"; {info['date']}")

        # Warm-up: one prompt through every step, untimed (first-call costs: kernels, allocator).
        warm = run_arm(stage, args, model, "batched", 1, work / "runs")
        print(f"warm-up: 1 prompt in {warm['wall_s']:.1f} s")

        runs: dict[str, list[dict]] = {arm: [] for arm in arms}
        for rep in range(1, args.repeats + 1):  # arms interleaved, so a burst of other load hits both
            for arm in arms:
                n = args.prompts if arm.startswith("batched") else (args.serial_prompts or args.prompts)
                print(f"run {rep}/{args.repeats}, {arm}: {n} prompts ...", flush=True)
                r = run_arm(stage, args, model, arm, n, work / "runs")
                runs[arm].append(r)
                other = "" if r["other_cpu_s"] is None else f", other processes {r['other_cpu_s']:.1f} CPU s"
                print(f"  {r['wall_s']:.1f} s, {r['backend_calls']} backend calls, {r['generated_tokens']} tokens, "
                      f"{r['cpu_s']:.1f} CPU s{other}, steps {r['step_s']}", flush=True)
                if r["other_cpu_s"] and r["other_cpu_s"] > 0.05 * r["wall_s"]:
                    print("  warning: other processes used the CPUs during this run; its timing is suspect")
        # The fastest run of each arm: other load only ever slows a run down.
        rows = []
        for arm in arms:
            best = dict(min(runs[arm], key=lambda r: r["wall_s"]))
            best["wall_all_s"] = [round(r["wall_s"], 2) for r in runs[arm]]
            best["other_cpu_all_s"] = [None if r["other_cpu_s"] is None else round(r["other_cpu_s"], 1) for r in runs[arm]]
            rows.append(best)

        by = {r["arm"]: r for r in rows}
        speedup = None
        if "batched" in by and "serial" in by:
            speedup = by["serial"]["s_per_prompt"] / by["batched"]["s_per_prompt"]
        label = args.model + (" (4-bit)" if args.load_in_4bit else "")
        print()
        print(table(label, params, rows))
        if speedup is not None:
            same = by["serial"]["prompts"] == by["batched"]["prompts"]
            cpu_ratio = (by["serial"]["cpu_s"] / by["serial"]["prompts"]) / (by["batched"]["cpu_s"] / by["batched"]["prompts"])
            print(f"\nbatched vs one-at-a-time: {speedup:.2f}x faster per prompt in wall time ({cpu_ratio:.2f}x in CPU time)"
                  + ("" if same else f" (serial arm on {by['serial']['prompts']} prompts, batched on {by['batched']['prompts']})")
                  + f"; goal >= 5x: {'met' if speedup >= 5 else 'NOT met'}")
        rows += sim_rows
        result = {"model": args.model, "params": params, "settings": {
                      k: v for k, v in vars(args).items() if k not in ("out",)},
                  "fixed_length": not args.free_length, "machine": info, "arms": rows, "speedup_per_prompt": speedup,
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
            print(f"results: {args.out}")
        return result
    finally:
        from safecot.backends import release_backends
        release_backends()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
