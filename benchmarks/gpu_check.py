"""The GPU check: speed and memory of what stages 1, 3 and 4 do, on a random-initialised model of
real size (Qwen2.5-7B's architecture), with no Hub access, in under 8 minutes, each figure beside
the figure it should be compared with. One JSON and one Markdown table.

    python benchmarks/gpu_check.py --out gpu_check.json                      # on a GPU: 7B, ~5-7 minutes
    python benchmarks/gpu_check.py --size tiny --steps 1 --seq-len 64 --gen-prompts 2 --gen-tokens 4 --out /tmp/c.json  # CPU, seconds

Parts, each through the project's own code (the model loader is the only thing replaced: it builds a
random model of the chosen size instead of reading weights, with the 4-bit setting and dtype the
stage asks for):
  sft       stage 3's trainer (03_sft.py: build_trainer, i.e. safecot.training's 4-bit base, LoRA,
            SFTConfig and callbacks) on the recipe's sft settings, sequences of --seq-len tokens:
            tokens/s per optimiser step and peak memory.
  dpo       stage 4's trainer (04_dpo.py: build_trainer) from the adapter the sft part saved, which
            trl also copies as the frozen reference: seconds per step and peak memory.
  generate  stage 1's initial-CoT prompts (the recipe's policies in the system turn) for the first
            --gen-prompts seed prompts, one batched call of safecot.backends.HFBackend with the
            recipe's llm settings, every answer --gen-tokens long: generated tokens/s.
  judges    stage 5's guard judges (safecot/guards.py: GuardJudge through the scheduler, as stage 5
            runs them) on a random Llama-3.1-8B-sized model (Llama Guard 3 8B's architecture, and the
            CoT grader's), in the recipe's 4-bit: --judge-items (request, answer) pairs judged with a
            text verdict of --judge-tokens new tokens (Llama Guard's `unsafe\nS1,S10` is 6-10) and
            with a scored one (one position read, as StrongREJECT and ShieldGemma): verdicts/s and
            peak memory, the figures README's "Judges on one GPU" table has no measurement for yet.
  vllm      the same prompt token ids through vLLM (random "dummy" weights, bf16), in a child
            process, where `import vllm` works; skipped with a line otherwise.
Each training part runs --warmup untimed steps, then --steps timed ones, and stops early when the
check's time budget (--budget-s) would be exceeded; a part that no longer fits is skipped and says so.
Memory is torch.cuda.max_memory_allocated, reset at the start of each part (on a CPU: the process's
peak resident memory, which cannot be reset). Token ids are drawn in range: speed does not depend on
the text. The tokenizer is the project's tiny one (safecot/tiny.py), so prompt lengths are counted in
its tokens, not Qwen's.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen/Qwen2.5-7B-Instruct's config.json as published (transformers 4.43.3; a verbatim copy was read
# with the search tool, and bench_train.py's ARCHS agrees), so no Hub access is needed.
SIZES = {
    "7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
               intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               max_position_embeddings=32768, max_window_layers=28, rope_theta=1e6, rms_norm_eps=1e-6,
               hidden_act="silu", attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings=False,
               use_sliding_window=False, sliding_window=None),
    # Llama Guard 3 8B = Llama-3.1-8B's architecture (8,030,261,248 parameters; its rope scaling for long
    # contexts is left out: it does not change the speed of the short prompts judged here)
    "judge-7b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                     intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                     tie_word_embeddings=False),
    "judge-tiny": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=4096, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # the same architecture, CPU-sized, for the tests (a vocabulary wider than the tiny tokenizer's, as the 7B's is)
    "tiny": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=4096, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 use_sliding_window=False, sliding_window=None),
}

# What each figure is compared with. The SFT anchor is Unsloth's published comparison for one GPU
# (plain 4-bit QLoRA of a 7B at 2048 tokens); the recipe's own claim is configs/qwen2.5-7b.yaml's comment.
ANCHORS = {
    "sft_tokens_per_s": {"value": 2400, "what": "plain 4-bit QLoRA of a 7B on one GPU, 2048 tokens (Unsloth: ~3,700)"},
    "sft_peak_gib": {"value": 9.0, "what": "plain 4-bit QLoRA of a 7B on one GPU, 2048 tokens"},
    "sft_recipe_gib": {"value": 14.0, "what": "configs/qwen2.5-7b.yaml's sft comment: ~14 GB at 2048 tokens"},
    "dpo_step_s": {"value": None, "what": "the SFT anchor's rate over chosen+rejected (forward+backward) plus "
                                          "the reference's forward (a third of that): 2 x B x T x 4/3 / 2400 s"},
    "generate_tokens_per_s": {"value": None, "what": "vLLM on the same prompts in this run (the vllm part)"},
}
BUDGET_S = 440                          # the whole check: with start-up and the last part's overrun, inside 8 minutes


def load_script(name: str):
    """A stage script (03_sft.py ...) as a module, despite its leading digit."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


# ---- a random model of real size, built on the GPU ---------------------------------------------

def quantise(model, dtype: str) -> None:
    """Every decoder Linear (not the LM head) to an nf4 double-quantised Linear4bit, on the device
    its weight is on (no CPU copy of 7B weights), and the model marked as transformers marks a
    4-bit from_pretrained, so peft, trl and the Trainer treat it as the stages' loaded base."""
    import torch
    import bitsandbytes as bnb
    from transformers.quantizers import AutoHfQuantizer
    from safecot.models import disable_avx512bf16_repack, quantization_config
    qc = quantization_config(dtype)
    # By name, not by module: a list of the modules would keep every bf16 weight alive until the end.
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    for name in linears:
        parent_name, _, child_name = name.rpartition(".")
        module = model.get_submodule(parent_name)
        child = getattr(module, child_name)
        with torch.device("meta"):  # no CPU allocation and init of a throwaway weight
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=qc.bnb_4bit_compute_dtype, compress_statistics=True,
                                  quant_type="nf4", quant_storage=torch.uint8)
        weight = child.weight.data
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.uint8, module=q).to(weight.device)  # quantises here
        if child.bias is not None:
            q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        setattr(module, child_name, q)
        del child, weight
    model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    model.is_quantized, model.quantization_method, model.is_loaded_in_4bit = True, qc.quant_method, True
    model.config.quantization_config = qc
    disable_avx512bf16_repack(model)


def random_model(size: str, load_in_4bit: bool, dtype: str = "auto"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from safecot.models import load_tokenizer, torch_dtype
    tok = load_tokenizer("tiny")
    arch = dict(SIZES[size])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs, in the compute dtype
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    if load_in_4bit:
        quantise(model, dtype)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    start_part()  # building in bf16 then quantising peaks above what loading a 4-bit checkpoint does: not measured
    return model.eval()


@contextlib.contextmanager
def random_weights(size: str):
    """safecot.models.load_model builds a random `size` model (with the 4-bit setting, dtype and
    adapter the caller asks for) instead of reading one: the stages' code runs as it is."""
    from safecot import models
    real, asked = models.load_model, []

    def load_model(name, load_in_4bit=False, dtype="auto", adapter=None, trainable_adapter=False, **_):
        asked.append({"name": name, "load_in_4bit": load_in_4bit, "dtype": dtype, "adapter": adapter})
        model = random_model(size, load_in_4bit, dtype)
        if adapter:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
        return model

    models.load_model = load_model
    try:
        yield asked
    finally:
        models.load_model = real


# ---- measuring -----------------------------------------------------------------------------------

def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def start_part() -> float:
    """Free what the previous part left and restart the peak, so each part's peak is its own; the
    GiB still allocated (a part that leaks shows here)."""
    import torch
    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return round(torch.cuda.memory_allocated() / 2**30, 3)


def peak_gib() -> float:
    from safecot.training import peak_memory_gib
    return round(peak_memory_gib(), 3)


def step_clock(warmup: int, deadline: float):
    """A TrainerCallback timing each optimiser step; it stops training once the timed steps would
    run past the deadline (at least one timed step is always taken)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        times: list = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.times.append(now - self.t)
            timed = self.times[warmup:]
            if timed and now + sum(timed) / len(timed) > deadline:
                control.should_training_stop = True

    clock = StepClock()
    clock.times = []
    return clock


def timed(clock, warmup: int) -> list[float]:
    steps = clock.times[warmup:]
    if not steps:
        raise RuntimeError(f"no timed step: only {len(clock.times)} step(s) ran")
    return steps


def random_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def recipe_for(args, work: Path, section: str, extra: list[str]) -> object:
    from safecot.config import load_recipe, section_config
    module = load_script({"sft": "03_sft", "dpo": "04_dpo"}[section])
    steps = args.warmup + args.steps
    overrides = [f"runs_dir={work}", "run_name=gpu-check", f"{section}.max_steps={steps}", f"{section}.grad_accum=1",
                 f"{section}.logging_steps=1", f"{section}.save_steps={10 * steps}", *extra]
    if args.seq_len:
        overrides.append(f"{section}.max_length={args.seq_len}")
    if args.batch:
        overrides.append(f"{section}.batch_size={args.batch}")
    return module, section_config(load_recipe(ROOT / args.recipe, overrides), section, module.Config)


def part_sft(args, work: Path, deadline: float) -> dict:
    from datasets import Dataset
    from safecot import training
    from safecot.models import load_tokenizer
    sft, cfg = recipe_for(args, work, "sft", ["sft.model=tiny"])
    tokenizer = load_tokenizer("tiny", padding_side="right")
    B, T, rng = cfg.batch_size, cfg.max_length, random.Random(0)
    vocab = min(len(tokenizer), SIZES[args.size]["vocab_size"])
    rows = [{"input_ids": random_ids(T, vocab, rng), "assistant_masks": [0] * (T // 8) + [1] * (T - T // 8)}
            for _ in range(B * (args.warmup + args.steps))]
    out = work / "gpu-check" / "03_sft"
    out.mkdir(parents=True, exist_ok=True)
    with random_weights(args.size) as asked:
        trainer = sft.build_trainer(cfg, out, tokenizer, Dataset.from_list(rows))
    clock = step_clock(args.warmup, deadline)
    trainer.add_callback(clock)
    training.train_resuming(trainer, out / "checkpoints")
    steps = timed(clock, args.warmup)
    step_s = sum(steps) / len(steps)
    import bitsandbytes as bnb
    quantised = sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())  # (not peft's LoRA wrappers)
    result = {"status": "ok", "batch_size": B, "seq_len": T, "linear4bit_layers": quantised, "gradient_checkpointing": bool(
                  cfg.gradient_checkpointing and training.on_gpu()), "load_in_4bit": asked[0]["load_in_4bit"],
              "lora_r": cfg.lora.r, "timed_steps": len(steps), "step_s": round(step_s, 3),
              "tokens_per_s": round(B * T / step_s, 1), "peak_gib": peak_gib()}
    training.save_adapter(trainer.model, tokenizer, work / "sft_adapter")  # the dpo part starts from it
    del trainer
    return result


def part_dpo(args, work: Path, deadline: float, adapter: str | None) -> dict:
    from safecot import training
    from safecot.models import load_tokenizer
    dpo, cfg = recipe_for(args, work, "dpo", [])
    tokenizer = load_tokenizer("tiny", padding_side="left")
    B, T, rng = cfg.batch_size, cfg.max_length, random.Random(1)
    vocab = min(len(tokenizer), SIZES[args.size]["vocab_size"])
    prompt = T // 4  # a policy-laden prompt, then a reasoning + answer per side
    rows = [{"prompt_ids": random_ids(prompt, vocab, rng), "chosen_ids": random_ids(T - prompt, vocab, rng),
             "rejected_ids": random_ids(T - prompt, vocab, rng)} for _ in range(B * (args.warmup + args.steps))]
    start = {"base": "tiny", "adapter": adapter, "load_in_4bit": cfg.load_in_4bit, "dtype": cfg.dtype}
    out = work / "gpu-check" / "04_dpo"
    out.mkdir(parents=True, exist_ok=True)
    with random_weights(args.size):
        trainer = dpo.build_trainer(cfg, out, start, tokenizer, rows, {})
    clock = step_clock(args.warmup, deadline)
    trainer.add_callback(clock)
    training.train_resuming(trainer, out / "checkpoints")
    steps = timed(clock, args.warmup)
    step_s = sum(steps) / len(steps)
    del trainer
    return {"status": "ok", "pairs_per_step": B, "seq_len": T, "prompt_tokens": prompt, "beta": cfg.beta,
            "reference": "the starting adapter, frozen (trl's 'ref' copy)" if adapter else "the bare model (no sft adapter)",
            "timed_steps": len(steps), "step_s": round(step_s, 3), "tokens_per_s": round(2 * B * T / step_s, 1),
            "peak_gib": peak_gib(), "expected_step_s": round(2 * B * T * 4 / 3 / ANCHORS["sft_tokens_per_s"]["value"], 2)}


def stage1_chats(args) -> tuple[list, dict]:
    """Stage 1's initial-CoT requests (01_generate.py: aidsafe, step 2) for the first seed prompts."""
    from safecot.config import load_recipe
    from safecot.records import read_jsonl
    from safecot.templates import load_policies, load_template
    recipe = load_recipe(ROOT / args.recipe)
    policies = load_policies(ROOT / recipe.get("policies", "data/policies/cases.yaml")).text()
    template = load_template("initial_cot", ROOT / "data" / "templates")
    seeds = read_jsonl(ROOT / "data" / "prompts" / "seed.jsonl")[:args.gen_prompts]
    intents = "Explicit: what the request literally asks for.\nImplicit: the need behind it."
    return [template.chat(prompt=s["prompt"], policies=policies, intents=intents) for s in seeds], recipe


def part_generate(args, deadline: float) -> tuple[dict, list[list[int]]]:
    from safecot.backends import HFBackend, LLMConfig, common_prefix_len
    chats, recipe = stage1_chats(args)
    llm = LLMConfig().merged(recipe.get("llm")).merged({"backend": "hf", "model": "tiny", "max_new_tokens": args.gen_tokens,
                                                        "structured": False})  # a grammar is not what is measured
    with random_weights(args.size):
        backend = HFBackend(llm)
    warm = llm.merged({"max_new_tokens": 2})
    backend.generate(chats[:2], warm)  # kernels, allocator: not what is measured
    backend.model.generation_config.min_new_tokens = args.gen_tokens  # every answer exactly this long
    ids = backend.chat.prompt_ids(chats)
    sync()
    t0 = time.perf_counter()
    gens = backend.generate(chats, llm)
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(g.tokens for g in gens)
    errors = [g.error for g in gens if g.error]
    if errors:
        raise RuntimeError(f"{len(errors)} generation(s) failed: {errors[0]}")
    shared = common_prefix_len(ids)
    result = {"status": "ok", "prompts": len(chats), "batch_size": llm.batch_size,
              "micro_batches": -(-len(chats) // llm.batch_size),
              "load_in_4bit": llm.load_in_4bit, "share_prefix": llm.share_prefix,
              "temperature": llm.temperature, "shared_prefix_tokens": shared,
              "own_tokens_mean": round(sum(len(r) - shared for r in ids) / len(ids), 1), "new_tokens": args.gen_tokens,
              "generated_tokens": tokens, "wall_s": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
              "peak_gib": peak_gib(), "over_budget": time.perf_counter() > deadline}
    del backend
    return result, ids


def part_judges(args, deadline: float) -> dict:
    """GuardJudge verdicts as stage 5 asks them (scheduler.gather, the hf backend's batched ticks) on
    a random judge-sized model: a text verdict (llamaguard3, every reply --judge-tokens long) and a
    scored one (strongreject: the logits of one position)."""
    from safecot.backends import LLMConfig
    from safecot.guards import GUARDS, GuardJudge, guard_config
    _, recipe = stage1_chats(args)
    base = LLMConfig().merged(recipe.get("llm")).merged({"backend": "hf"})
    seeds = [s["prompt"] for s in __import__("safecot.records", fromlist=["read_jsonl"]).read_jsonl(
        ROOT / "data" / "prompts" / "seed.jsonl")]
    rng = random.Random(2)
    words = ["the", "first", "step", "is", "to", "check", "whether", "this", "would", "help", "anyone", "safely"]
    items = [{"prompt": seeds[i % len(seeds)], "answer": " ".join(rng.choice(words) for _ in range(args.judge_answer_words))}
             for i in range(args.judge_items)]
    out = {"status": "ok", "architecture": f"judge-{args.size}", "items": len(items), "answer_words": args.judge_answer_words,
           "load_in_4bit": base.load_in_4bit, "batch_size": base.batch_size}
    with random_weights(f"judge-{args.size}"):
        for kind, label in (("llamaguard3", "text"), ("strongreject", "scored")):
            if time.perf_counter() > deadline:
                out[label] = {"status": "skipped", "reason": "over budget"}
                continue
            tokens = args.judge_tokens if kind == "llamaguard3" else GUARDS[kind].max_new_tokens
            judge = GuardJudge(GUARDS[kind].tasks[0], kind, guard_config(GUARDS[kind], base, {"model": "tiny",
                                                                                               "max_new_tokens": tokens}))
            model = judge.agent.backend.model  # loads here, inside random_weights (the same model for both)
            judge(items[:2])  # kernels, allocator: not what is measured
            model.generation_config.min_new_tokens = tokens  # every text verdict exactly this long
            sync()
            t0 = time.perf_counter()
            verdicts = judge(items)
            sync()
            dt = time.perf_counter() - t0
            model.generation_config.min_new_tokens = None
            failed = [v["error"] for v in verdicts if v.get("error")]
            if failed:
                raise RuntimeError(f"{len(failed)} verdict(s) failed: {failed[0]}")
            out[label] = {"kind": kind, "new_tokens": tokens, "wall_s": round(dt, 3),
                          "verdicts_per_s": round(len(items) / dt, 2)}
    out["peak_gib"] = peak_gib()
    return out


def part_vllm(args, ids: list[list[int]], deadline: float, work: Path) -> dict:
    """vLLM in a child process (its engine starts processes of its own and wants the GPU memory
    this process no longer holds), on the same prompt token ids; skipped where it is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped", "reason": "vllm is not installed (pip install vllm to compare)"}
    left = deadline - time.perf_counter()
    if left < 60:
        return {"status": "skipped", "reason": f"over budget: {left:.0f} s left, vLLM's start alone takes about a minute"}
    job = work / "vllm_job.json"
    job.write_text(json.dumps({"size": args.size, "ids": ids, "max_tokens": args.gen_tokens, "eager": args.vllm_eager,
                               "folder": str(work / "vllm_model")}))
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--vllm-child", str(job)], capture_output=True, text=True,
                              timeout=left)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"over budget: vLLM did not finish in the {left:.0f} s left"}
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("VLLM_RESULT ")), None)
    if done.returncode or line is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": f"vLLM child exited {done.returncode}: {tail}"}
    return {"status": "ok", **json.loads(line[len("VLLM_RESULT "):])}


def vllm_child(job_path: str) -> None:
    from vllm import LLM, SamplingParams
    job = json.loads(Path(job_path).read_text())
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**SIZES[job["size"]], "torch_dtype": "bfloat16"}))
    longest = max(len(r) for r in job["ids"]) + job["max_tokens"]
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=0.6, max_model_len=min(SIZES[job["size"]]["max_position_embeddings"], longest + 64),
              enforce_eager=job["eager"], enable_prefix_caching=True)
    load_s = time.perf_counter() - t0
    params = dict(temperature=0.7, top_p=0.95, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": job["ids"][0]}], SamplingParams(max_tokens=2, **params), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r} for r in job["ids"]], SamplingParams(max_tokens=job["max_tokens"], **params),
                        use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    import vllm
    print("VLLM_RESULT " + json.dumps({"vllm": vllm.__version__, "dtype": "bfloat16", "enforce_eager": job["eager"],
                                       "engine_start_s": round(load_s, 1), "prompts": len(outs), "generated_tokens": tokens,
                                       "wall_s": round(dt, 3), "tokens_per_s": round(tokens / dt, 1)}), flush=True)


# ---- the report ----------------------------------------------------------------------------------

def machine() -> dict:
    import torch
    import transformers
    import trl
    import peft
    gpu = torch.cuda.is_available()
    info = {"gpu": torch.cuda.get_device_name() if gpu else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__}
    with contextlib.suppress(ImportError):
        import bitsandbytes
        info["bitsandbytes"] = bitsandbytes.__version__
    return info


def table(result: dict) -> str:
    parts, rows = result["parts"], []

    def row(part, figure, key, anchor=None, unit=""):
        p = parts.get(part) or {}
        if p.get("status") != "ok":
            rows.append(f"| {part} | {figure} | {p.get('status', 'not run')}: {p.get('reason', '')} | | |")
            return
        value = p.get(key)
        a = anchor if anchor is not None else None
        ratio = f"{value / a:.2f}x" if isinstance(value, (int, float)) and a else ""
        rows.append(f"| {part} | {figure} | {value}{unit} | {'' if a is None else f'{a}{unit}'} | {ratio} |")

    sft = parts.get("sft") or {}
    row("sft", f"tokens/s (batch {sft.get('batch_size')} x {sft.get('seq_len')})", "tokens_per_s",
        ANCHORS["sft_tokens_per_s"]["value"])
    row("sft", "peak memory (vs the 9 GiB anchor)", "peak_gib", ANCHORS["sft_peak_gib"]["value"], " GiB")
    row("sft", "peak memory (vs the recipe's ~14 GB)", "peak_gib", ANCHORS["sft_recipe_gib"]["value"], " GiB")
    row("dpo", "seconds per step (vs the SFT anchor's rate)", "step_s", (parts.get("dpo") or {}).get("expected_step_s"), " s")
    row("dpo", "peak memory", "peak_gib", None, " GiB")
    vllm = parts.get("vllm") or {}
    row("generate", "hf tokens/s (vs vLLM, same prompts)", "tokens_per_s",
        vllm.get("tokens_per_s") if vllm.get("status") == "ok" else None)
    row("generate", "peak memory", "peak_gib", None, " GiB")
    judges = parts.get("judges") or {}
    for label in ("text", "scored"):
        j = judges.get(label) or {}
        if judges.get("status") == "ok" and "verdicts_per_s" in j:
            rows.append(f"| judges | {j['kind']} verdicts/s ({label}: {j['new_tokens']} new token(s), "
                        f"{judges['items']} items) | {j['verdicts_per_s']} | | |")
        else:
            rows.append(f"| judges | {label} verdicts/s | {judges.get('status', 'not run')}: "
                        f"{judges.get('reason', j.get('reason', ''))} | | |")
    row("judges", "peak memory", "peak_gib", None, " GiB")
    row("vllm", "tokens/s", "tokens_per_s")
    head = (f"GPU check, size {result['size']}, {result['machine']['gpu'] or 'CPU: ' + result['machine']['cpu']}, "
            f"{result['wall_s']:.0f} s\n\n| part | figure | measured | compared with | ratio |\n|---|---|---:|---:|---:|")
    return head + "\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="7b")
    p.add_argument("--recipe", default="configs/qwen2.5-7b.yaml", help="whose llm, sft and dpo settings are measured")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence / pair side (default: the recipe's max_length)")
    p.add_argument("--batch", type=int, default=None, help="sequences / pairs per step (default: the recipe's batch_size)")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per training part")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--gen-prompts", type=int, default=16, help="stage-1 prompts in the one timed batched call")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--judge-items", type=int, default=64, help="(request, answer) pairs each judge part judges")
    p.add_argument("--judge-answer-words", type=int, default=300, help="words of each answer judged")
    p.add_argument("--judge-tokens", type=int, default=8, help="new tokens of a text verdict (Llama Guard's: 6-10)")
    p.add_argument("--parts", default="sft,dpo,generate,judges,vllm")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check's time budget")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without CUDA graphs (a faster start, slower decoding)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON; the table goes beside it as .md")
    p.add_argument("--vllm-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vllm_child:
        vllm_child(args.vllm_child)
        return {}

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    wanted = args.parts.split(",")
    result = {"size": args.size, "architecture": SIZES[args.size], "recipe": args.recipe, "machine": machine(),
              "budget_s": args.budget_s, "anchors": ANCHORS, "parts": {}}
    # Each part's share of what is left when it starts, so a slow part cannot starve the rest entirely.
    shares = {"sft": 0.3, "dpo": 0.4, "generate": 0.4, "judges": 0.5, "vllm": 1.0}
    ids = None
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        for part in ("sft", "dpo", "generate", "judges", "vllm"):
            if part not in wanted:
                continue
            now, held = time.perf_counter(), start_part()
            part_deadline = now + shares[part] * (deadline - now)
            if now > deadline:
                result["parts"][part] = {"status": "skipped", "reason": f"over budget ({args.budget_s:.0f} s spent)"}
                continue
            print(f"== {part}", flush=True)
            try:
                if part == "sft":
                    out = part_sft(args, work, part_deadline)
                elif part == "dpo":
                    adapter = work / "sft_adapter"
                    out = part_dpo(args, work, part_deadline, str(adapter) if adapter.is_dir() else None)
                elif part == "generate":
                    out, ids = part_generate(args, part_deadline)
                elif part == "judges":
                    out = part_judges(args, part_deadline)
                else:
                    out = part_vllm(args, ids, deadline, work) if ids else {
                        "status": "skipped", "reason": "needs the generate part's prompts"}
            except Exception as e:  # one part's failure is a figure too; the others still run
                out = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            out["part_s"], out["held_at_start_gib"] = round(time.perf_counter() - now, 1), held
            result["parts"][part] = out
            print(f"   {json.dumps(out)}", flush=True)
            start_part()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    text = table(result)
    out_path.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(p.get("status") == "failed" for p in res.get("parts", {}).values()) else 0)
