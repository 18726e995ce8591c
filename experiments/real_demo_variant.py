"""One trigger-RL or GRPO variant on a seed's cached SFT weaver, scored on the *validation* splits.

How the real demo's trigger settings are chosen: each variant trains the trigger exactly as the
``memgen_trigger`` arm does (same mix, same weaver) with some settings changed, into its own
directory, then decodes the validation in-domain and known sets with the trained trigger
(greedy, threshold 0.5). A finished variant is read back, not re-run. No test split is read.

    python experiments/real_demo_variant.py --name init0.9 --trigger-init-prob 0.9
    python experiments/real_demo_variant.py --arm memgen_grpo --name grpo-lr1e-5 --grpo-lr 1e-5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from memgen.demo import real_arms
from memgen.demo.real_model import RealDemoConfig, _eval_config, load_reasoner, seed_data
from memgen.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the variant's directory under --variants")
    parser.add_argument("--arm", default="memgen_trigger", choices=["memgen_trigger", "memgen_grpo"])
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--runs", default="runs/real-demo", help="the real demo's --out (its seed's SFT weaver)")
    parser.add_argument("--variants", default="runs/trigger-variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trigger-init-prob", type=float, default=0.9)
    parser.add_argument("--trigger-steps", type=int, default=30)
    parser.add_argument("--trigger-lr", type=float, default=3e-3)
    parser.add_argument("--sparsity-lambda", type=float, default=0.05)
    parser.add_argument("--rollout-temperature", type=float, default=0.7)
    args = parser.parse_args()
    cfg = replace(
        RealDemoConfig(out=args.runs, progress=False).effective(),
        seed=args.seed,
        trigger_init_prob=args.trigger_init_prob,
        trigger_steps=args.trigger_steps,
        trigger_lr=args.trigger_lr,
        sparsity_lambda=args.sparsity_lambda,
        rollout_temperature=args.rollout_temperature,
        grpo_lr=args.grpo_lr,
    )
    seed_dir = Path(args.variants) / args.name / f"seed-{args.seed}"
    weaver = seed_dir / "adapters" / "memgen_sft"
    if not weaver.exists():
        weaver.parent.mkdir(parents=True, exist_ok=True)
        weaver.symlink_to((Path(args.runs) / f"seed-{args.seed}" / "adapters" / "memgen_sft").resolve())
    base, tokenizer, _ = load_reasoner(cfg)
    data = seed_data(replace(cfg, gsm8k_size=0), args.seed)
    started = time.perf_counter()
    if real_arms.train_info(seed_dir / "adapters" / args.arm) is None:
        torch.manual_seed(args.seed * 101 + real_arms.ARMS.index(args.arm))
        train = data["mix"] if args.arm == "memgen_trigger" else data["train"]
        real_arms.TRAINERS[args.arm](base, tokenizer, cfg, seed_dir, train)
    model = real_arms.load_arm(args.arm, base, tokenizer, cfg, seed_dir)
    result = {"variant": args.name, **{k: v for k, v in vars(args).items() if k not in ("name", "runs", "variants")}}
    for name, task in data["validation"].items():
        config = _eval_config(cfg, args.arm, name, args.seed, seed_dir / "validation" / f"{name}.jsonl")
        summary = evaluate(model, task, config)
        result[name] = {k: summary[k] for k in ("accuracy", "mean_insertions", "invocation_rate", "n")}
    result["seconds"] = round(time.perf_counter() - started, 1)
    (seed_dir / "validation.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
