"""Speed and memory of QLoRA training steps (stage 3's SFT step, stage 4's DPO step) for a model
architecture at a sequence length: tokens/s, peak memory, estimated model FLOPs utilisation.

    python benchmarks/bench_train.py --tiny --seq-len 256                 # the project's tiny model
    python benchmarks/bench_train.py --config-name small --seq-len 512    # a ~60M random model, CPU-sized
    python benchmarks/bench_train.py --config-name qwen2.5-7b --seq-len 2048 --out bench.json   # GPU

The model is random-initialised from a hard-coded architecture (Qwen2.5-7B's or Mistral-7B's
config.json values, no Hub), its linear layers quantised to nf4 with double quantisation as
QLoRA does (bf16 compute on a GPU, fp32 on a CPU), and a rank-16 LoRA adapter put on every linear
layer. Each step is one micro-batch of random tokens: SFT = forward, backward, optimiser step;
DPO = the same on chosen+rejected plus a no-grad forward of the reference adapter. Activation
checkpointing is on for a GPU (as the 7B recipes), off on a CPU.

MFU counts model FLOPs without recomputation, for a frozen base (no weight gradients except
LoRA's, which are negligible): per token 4N + 12·L·d·T for an SFT step (N linear-layer weights,
L layers, d hidden size, T sequence length; attention counted as non-causal, as PaLM's formula
does), and 6N + 16·L·d·T per token of the pair for a DPO step (policy forward+backward plus the
reference forward). The peak is the GPU's dense bf16 figure (--peak-tflops to give another); on a
CPU MFU is not reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARCHS = {  # config.json values of the real models, so no Hub access is needed
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "small": dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                  num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "A10": 125.0}


def build(args, device, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if args.tiny:
        from safecot.models import resolve_model
        config = AutoConfig.from_pretrained(resolve_model("tiny"))
    else:
        arch = dict(ARCHS[args.config_name])
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantise(model, dtype, device)
    return model, config


def quantise(model, dtype, device) -> None:
    """Replace every decoder nn.Linear (not the LM head, as QLoRA) with an nf4 Linear4bit."""
    import torch
    import bitsandbytes as bnb
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "lm_head" not in f"{name}.{child_name}":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                q = q.to(device)
                q.support_avx512bf16_for_cpu = False  # the gradient guard, as in safecot.models
                setattr(module, child_name, q)
                del child
    if device == "cuda":
        torch.cuda.empty_cache()


def linear_params(config) -> int:
    d, f, L, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = d // config.num_attention_heads * config.num_key_value_heads
    return L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", choices=sorted(ARCHS), default="small")
    p.add_argument("--tiny", action="store_true", help="the project's tiny model instead")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences (SFT) or pairs (DPO) per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase, after --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from safecot.training import peak_memory_gib
    from trl.trainer.utils import use_adapter

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    model, config = build(args, device, dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.add_adapter("ref", lora)
    model.set_adapter("default")
    if gpu:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    else:
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    model.train()
    B, T = args.batch, args.seq_len
    name = "tiny" if args.tiny else args.config_name

    def logps(ids):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(-1)

    def sft_step():
        ids = torch.randint(0, config.vocab_size, (B, T), device=device)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return B * T

    def dpo_step():
        ids = torch.randint(0, config.vocab_size, (2 * B, T), device=device)
        with torch.no_grad(), use_adapter(model, adapter_name="ref"):
            ref = logps(ids)
        pol = logps(ids)
        margin = (pol[:B] - ref[:B]) - (pol[B:] - ref[B:])
        (-F.logsigmoid(0.1 * margin).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 2 * B * T

    n, L, d = linear_params(config), config.num_hidden_layers, config.hidden_size
    flops_per_token = {"sft": 4 * n + 12 * L * d * T, "dpo": 6 * n + 16 * L * d * T}
    peak = args.peak_tflops
    if peak is None and gpu:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    results = {"model": name, "seq_len": T, "batch": B, "lora_rank": args.rank, "linear_params": n,
               "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                                  f"{torch.get_num_threads()} threads)",
               "torch": torch.__version__, "phases": {}}
    for phase, step in (("sft", sft_step), ("dpo", dpo_step)):
        for _ in range(args.warmup):
            step()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += step()
        if gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tps = tokens / dt
        row = {"tokens_per_s": round(tps, 1), "step_s": round(dt / args.steps, 3),
               "peak_mem_gib": round(peak_memory_gib(), 3),
               "model_tflops_per_s": round(tps * flops_per_token[phase] / 1e12, 3)}
        if peak:
            row["mfu"] = round(row["model_tflops_per_s"] / peak, 4)
        results["phases"][phase] = row
        print(f"{name} T={T} {phase}: {row}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
