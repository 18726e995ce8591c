"""Training throughput: memgen weaver SFT against TRL's SFTTrainer + peft LoRA, same model, data, batch.

Prints JSON. Both train the same tiny randomly initialised Qwen2 (char-level tokenizer) on the
same GSM8K training examples (prompt and completion cut to a fixed number of characters, so
both sides see exactly the same tokens and nothing is truncated by either trainer), with
the same batch size, LoRA rank and target modules, in one process. Throughput counts
prompt + completion tokens per second, from the median optimizer-step time after warm-up.
memgen additionally weaves K latents at the prompt end and at up to ``--max-insertions``
delimiters per example, which is the work MemGen adds; that cost is part of its figure.

    python benchmarks/train_throughput.py [--steps 12] [--batch 8] [--hidden 256] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from memgen.precision import cpu_capability, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def records(n: int, prompt_chars: int, completion_chars: int) -> list[dict]:
    from memgen.tasks import gsm8k_records

    out = []
    for r in gsm8k_records(GSM8K)[:n]:
        out.append({"prompt": r.prompt[:prompt_chars], "completion": r.completion[:completion_chars]})
    return out


def bench_trl(model_dir: Path, rows: list[dict], args) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from memgen.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                           max_length=None, completion_only_loss=True, dataloader_num_workers=0,
                           disable_tqdm=True, seed=0, bf16=False, fp16=False)
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[StepTimer()])
        trainer.train()
    return times


def bench_memgen(model_dir: Path, rows: list[dict], args) -> tuple[list[float], dict]:
    from memgen.train import WeaverTrainConfig, train_weaver
    from memgen.train.logging import read_metrics

    with tempfile.TemporaryDirectory() as out:
        data = Path(out) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = WeaverTrainConfig(model=str(model_dir), data=str(data), output_dir=str(Path(out) / "run"),
                                   method="sft", max_steps=args.steps, per_device_batch_size=args.batch,
                                   learning_rate=1e-4, prompt_latents=args.k, inference_latents=args.k,
                                   lora_r=args.lora_r, lora_alpha=2 * args.lora_r, insertion="all",
                                   max_insertions=args.max_insertions, progress=False, save_every=0,
                                   tensorboard=False, max_completion_tokens=10_000, max_prompt_tokens=10_000)
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
    args = parser.parse_args()
    if not GSM8K.is_file():
        sys.exit(f"needs {GSM8K}")
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    rows = records(args.batch * args.steps, args.prompt_chars, args.completion_chars)
    tokenizer = tiny_tokenizer()
    tokens_per_step = sum(len(tokenizer(r["prompt"])["input_ids"]) + len(tokenizer(r["completion"])["input_ids"]) + 1
                          for r in rows[: args.batch])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "base"
        model = tiny_causal_lm(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        params = sum(p.numel() for p in model.parameters())
        from accelerate.state import AcceleratorState

        trl_times = bench_trl(model_dir, rows, args)
        AcceleratorState._reset_state(True)  # the Trainer's accelerator state would pin memgen's settings
        memgen_times, last = bench_memgen(model_dir, rows, args)
    trl_step = statistics.median(trl_times[args.warmup:])
    memgen_step = statistics.median(memgen_times[args.warmup:])
    print(json.dumps({
        "benchmark": "train_throughput", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(), "native_bf16": cpu_has_native_bf16(),
        "model_params_m": round(params / 1e6, 1), "batch": args.batch, "tokens_per_step": tokens_per_step,
        "lora_r": args.lora_r, "latents_per_insertion": args.k,
        "memgen_insertions_per_example": last.get("insertions_per_example"),
        "trl_lora_sft_tok_s": round(tokens_per_step / trl_step, 1),
        "memgen_weaver_sft_tok_s": round(tokens_per_step / memgen_step, 1),
        "memgen_over_trl_throughput": round(trl_step / memgen_step, 3),
        "target": ">= 0.7",
        "steps_timed": len(trl_times) - args.warmup,
    }, indent=2))


if __name__ == "__main__":
    main()
