"""Decode throughput: memgen (memory off / with insertions) against plain ``model.generate``.

Prints JSON. All three run in the same process on the same tiny randomly initialised Qwen2
models (about 8M and 50M parameters), greedy over the same prompts, every row producing
exactly ``--new-tokens`` tokens (EOS ignored), so ratios compare like with like. Insertions
use K=8 latents at a controlled rate of one per 16 tokens: every token counts as an
insertion point and ``random:1/16`` picks which ones, so the measured cost is that of the
weave-and-feed path, not of a particular vocabulary's delimiter frequency. Because every
row stays active and every fed token is a candidate, the decision draws depend only on the
seed, so the benchmark picks the first seed whose draws give each row its share of
insertions (within one) and reports the realised rate.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3] [--sizes 8M,50M] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from memgen import MemGen, MemGenConfig
from memgen.precision import cpu_capability, cpu_has_native_bf16
from memgen.tiny import DEFAULT_ALPHABET, tiny_causal_lm, tiny_tokenizer

SIZES = {
    "8M": dict(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=1024),
    "50M": dict(hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4, intermediate_size=2048),
}
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then",
    "Q: what is 3 + 4? A:",
    "The weaver writes memory.",
    "x",
    "Once upon a time, in a land far away,",
    "1, 2, 3,",
    "Hello there.",
    "def f(x):\n    return",
]
K = 8
RATE = 1 / 16


def balanced_seed(batch: int, new_tokens: int, rate: float) -> int:
    """First seed whose decision draws insert ``rate * new_tokens`` times in total, each row within one of it."""
    from memgen.engine import DECISION_SEED_OFFSET

    per_row = round(rate * new_tokens)
    for seed in range(100_000):
        gen = torch.Generator().manual_seed(seed + DECISION_SEED_OFFSET)
        draws = torch.stack([torch.rand(batch, generator=gen) for _ in range(new_tokens - 1)])
        counts = (draws < rate).sum(dim=0)
        if int(counts.sum()) == per_row * batch and int((counts - per_row).abs().max()) <= 1:
            return seed
    raise RuntimeError("no balanced seed found")


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds per function, running them in turn each round so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def tiny_model(size: str):
    tok = tiny_tokenizer()
    return tiny_causal_lm(tok, seed=0, max_positions=2048, **SIZES[size]), tok, list(DEFAULT_ALPHABET)


def real_model(source: str, dtype: str = "float32"):
    """A real checkpoint (directory, hub name or .gguf); every token's last character is a delimiter,
    so, as on the tiny models, every token is an insertion point and ``random:RATE`` picks them."""
    from memgen.loading import load_base

    base, tok = load_base(source, dtype=getattr(torch, dtype))
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return base, tok, sorted({t[-1] for t in texts if t})


def bench(size: str, batch: int, new_tokens: int, repeats: int, loaded=None) -> dict:
    base, tok, delimiters = loaded or tiny_model(size)
    base.generation_config.eos_token_id = None
    params = sum(p.numel() for p in base.parameters())
    prompts = (PROMPTS * batch)[:batch]
    enc = tok(prompts, padding=True, return_tensors="pt")

    def hf():
        with torch.inference_mode():
            return base.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    model = MemGen(base, tok, MemGenConfig(prompt_latents=K, inference_latents=K, delimiters=delimiters))
    common = dict(max_new_tokens=new_tokens, ignore_eos=True, insert_at_prompt_end=False)
    seed = balanced_seed(batch, new_tokens, RATE)
    times, outs = interleaved(
        {
            "generate": hf,
            "off": lambda: model.generate(prompts, memory="off", **common),
            "insert": lambda: model.generate(
                prompts, memory=f"random:{RATE}", seed=seed, max_insertions=new_tokens, **common
            ),
        },
        repeats,
    )
    t_hf, t_off, t_mem = times["generate"], times["off"], times["insert"]
    hf_out, off_out, mem_out = outs["generate"], outs["off"], outs["insert"]
    same = [c.token_ids for c in off_out.completions] == hf_out[:, enc["input_ids"].shape[1] :].tolist()
    inserted = sum(c.num_insertions for c in mem_out.completions)
    total = batch * new_tokens
    return {
        "model": size,
        "params_m": round(params / 1e6, 1),
        "batch": batch,
        "new_tokens_per_row": new_tokens,
        "generate_tok_s": round(total / t_hf, 1),
        "memgen_off_tok_s": round(total / t_off, 1),
        "memgen_insert_tok_s": round(total / t_mem, 1),
        "off_time_ratio_vs_generate": round(t_off / t_hf, 3),
        "insert_time_ratio_vs_generate": round(t_mem / t_hf, 3),
        "insertions_per_token": round(inserted / total, 4),
        "latents_per_insertion": K,
        "off_tokens_identical_to_generate": same,
        "insert_max_pad_slots": mem_out.stats["max_pad_slots"],
        "insert_compactions": mem_out.stats["compactions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="8M,50M")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument(
        "--model", default=None, help="a real base model (directory, hub name or .gguf) instead of the tiny --sizes"
    )
    parser.add_argument(
        "--base-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="with --model: the dtype the base runs in",
    )
    parser.add_argument("--quick", action="store_true", help="a few tokens on the 8M model: checks the script runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.batches, args.new_tokens, args.repeats = "8M", "1,2", 16, 1
    if args.model:
        # A fresh base per batch size: MemGen puts its LoRA layers into the base it is given.
        results = [
            bench(
                f"{args.model} ({args.base_dtype})",
                int(b),
                args.new_tokens,
                args.repeats,
                real_model(args.model, args.base_dtype),
            )
            for b in args.batches.split(",")
        ]
    else:
        results = [
            bench(size, int(b), args.new_tokens, args.repeats)
            for size in args.sizes.split(",")
            for b in args.batches.split(",")
        ]
    print(
        json.dumps(
            {
                "benchmark": "decode",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": cpu_capability(),
                "native_bf16": cpu_has_native_bf16(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "targets": {
                    "off_time_ratio_vs_generate": "<= 1.05",
                    "insert_time_ratio_vs_generate (50M, batch 1)": "<= 1.3",
                },
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
