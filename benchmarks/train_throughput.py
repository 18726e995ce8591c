"""Training throughput: memgen weaver SFT against TRL's SFTTrainer + peft LoRA, same model, data, batch.

Prints JSON. Both train the same tiny randomly initialised Qwen2 (char-level tokenizer) on the
same GSM8K training examples (prompt and completion cut to a fixed number of characters, so
both sides see exactly the same tokens and nothing is truncated by either trainer), with
the same batch size, LoRA rank and target modules, in one process. Throughput counts
prompt + completion tokens per second, from the median optimizer-step time after warm-up.
memgen additionally weaves K latents at the prompt end and at up to ``--max-insertions``
delimiters per example, which is the work MemGen adds; that cost is part of its figure.

With ``--model`` (a directory, hub name or ``.gguf``) both train that real checkpoint instead,
exported once to a plain directory; ``--mixed-precision bf16`` runs both under bf16 autocast
(TRL's ``bf16=True``). Peak resident memory of the process is reported after each side.

    python benchmarks/train_throughput.py [--steps 12] [--batch 8] [--hidden 256] [--layers 8]
    python benchmarks/train_throughput.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--mixed-precision bf16]
    python benchmarks/train_throughput.py --quick      # checks the script runs (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from memgen.precision import cpu_capability, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def records(n: int, prompt_chars: int, completion_chars: int) -> list[dict]:
    from memgen.tasks import gsm8k_records

    out = []
    for r in gsm8k_records(GSM8K)[0][:n]:
        out.append({"prompt": r.prompt[:prompt_chars], "completion": r.completion[:completion_chars]})
    return out


def bench_trl(model_dir: Path, rows: list[dict], args) -> list[float]:
    from support.trl_sft import StepTimer, sft_trainer
    from transformers import AutoModelForCausalLM

    from memgen.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.base_dtype))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = sft_trainer(
            model,
            tokenizer,
            rows,
            out,
            steps=args.steps,
            batch=args.batch,
            lora_r=args.lora_r,
            targets=TARGETS,
            timer=timer,
            bf16=args.mixed_precision == "bf16",
            fp16=False,
        )
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its summary; stdout is the JSON
            trainer.train()
    return timer.times


def bench_memgen(model_dir: Path, rows: list[dict], args) -> tuple[list[float], dict]:
    from memgen.train import WeaverTrainConfig, train_weaver
    from memgen.train.logging import read_metrics

    with tempfile.TemporaryDirectory() as out:
        data = Path(out) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = WeaverTrainConfig(
            model=str(model_dir),
            data=str(data),
            output_dir=str(Path(out) / "run"),
            method="sft",
            max_steps=args.steps,
            per_device_batch_size=args.batch,
            learning_rate=1e-4,
            prompt_latents=args.k,
            inference_latents=args.k,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            insertion="all",
            max_insertions=args.max_insertions,
            progress=False,
            save_every=0,
            tensorboard=False,
            max_completion_tokens=10_000,
            max_prompt_tokens=10_000,
            mixed_precision=args.mixed_precision,
            base_dtype=args.base_dtype,
        )
        train_weaver(config)
        rows_out = read_metrics(config.output_dir)
    return [r["step_seconds"] for r in rows_out], rows_out[-1]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--k", type=int, default=8, help="latents per insertion")
    parser.add_argument("--max-insertions", type=int, default=4, help="in-reasoning insertions per example")
    parser.add_argument("--prompt-chars", type=int, default=160)
    parser.add_argument("--completion-chars", type=int, default=160)
    parser.add_argument("--model", default=None, help="a real base model (directory, hub name or .gguf)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="autocast for both sides")
    parser.add_argument(
        "--base-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype the frozen base is stored in, both sides (peft and memgen keep LoRA in float32)",
    )
    parser.add_argument("--quick", action="store_true", help="3 steps of batch 2 on a 2-layer model: checks it runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.hidden, args.layers, args.lora_r = 3, 1, 2, 64, 2, 4
    if not GSM8K.is_file():
        sys.exit(f"needs {GSM8K}")
    from memgen.loading import export_base, load_tokenizer
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    rows = records(args.batch * args.steps, args.prompt_chars, args.completion_chars)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "base"
        if args.model:
            export_base(args.model, model_dir)
            tokenizer = load_tokenizer(model_dir)
        else:
            tokenizer = tiny_tokenizer()
            model = tiny_causal_lm(
                tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2
            )
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
            params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
        tokens_per_step = sum(
            len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["completion"])["input_ids"]) + 1
            for r in rows[: args.batch]
        )
        from accelerate.state import AcceleratorState

        trl_times = bench_trl(model_dir, rows, args)
        trl_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        AcceleratorState._reset_state(True)  # the Trainer's accelerator state would pin memgen's settings
        memgen_times, last = bench_memgen(model_dir, rows, args)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trl_step = statistics.median(trl_times[args.warmup :])
    memgen_step = statistics.median(memgen_times[args.warmup :])
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "device": "cpu",
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": cpu_capability(),
                "native_bf16": cpu_has_native_bf16(),
                "model": args.model or f"tiny qwen2 {args.hidden}x{args.layers}",
                "mixed_precision": args.mixed_precision,
                "base_dtype": args.base_dtype,
                "model_params_m": round(params / 1e6, 1),
                "batch": args.batch,
                "tokens_per_step": tokens_per_step,
                "lora_r": args.lora_r,
                "latents_per_insertion": args.k,
                "memgen_insertions_per_example": last.get("insertions_per_example"),
                "trl_lora_sft_tok_s": round(tokens_per_step / trl_step, 1),
                "memgen_weaver_sft_tok_s": round(tokens_per_step / memgen_step, 1),
                "memgen_over_trl_throughput": round(trl_step / memgen_step, 3),
                "target": ">= 0.7",
                "steps_timed": len(trl_times) - args.warmup,
                "trl_step_s": round(trl_step, 3),
                "memgen_step_s": round(memgen_step, 3),
                # ru_maxrss is the process's high-water mark: TRL runs first, so the memgen figure is
                # the larger of the two; run each side alone for memgen's own peak.
                "peak_rss_mb_after_trl": round(trl_peak_mb),
                "peak_rss_mb_after_memgen": round(peak_mb),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
