"""Why does the real demo's trigger learn to stay silent on the new skill? A validation-split probe.

Trigger RL sees only rollout rewards. This probe samples rollouts the way trigger RL does
(``G`` samples per prompt, temperature T) from the seed's SFT weaver, with memory off and
always, on the *validation* in-domain and known splits, and prints the mean task reward and
the share of prompt groups whose G rewards are not all equal (a group with equal rewards
gives the trigger no task signal, only the sparsity penalty). It reads the cached seed
adapter of ``memgen real-demo`` and never looks at a test split.

    python experiments/real_demo_rollout_probe.py --out runs/real-demo --seed 0 --temperatures 1.0 0.7 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from memgen.config import GenerateConfig
from memgen.data import prompt_token_ids
from memgen.demo import real_arms
from memgen.demo.real_model import RealDemoConfig, load_reasoner, seed_data
from memgen.tasks.rewards import cut_at_stop


def probe(model, task, records, temperature: float, memory: str, cfg, samples: int, seed: int) -> dict:
    prompts = [prompt_token_ids(r, model.tokenizer, True) for r in records]
    rewards = []
    for start in range(0, len(prompts), max(1, cfg.eval_batch_size // samples)):
        chunk = prompts[start : start + max(1, cfg.eval_batch_size // samples)]
        out = model.generate(
            chunk,
            GenerateConfig(
                memory=memory,
                do_sample=True,
                temperature=temperature,
                max_new_tokens=cfg.max_new_tokens,
                max_insertions=cfg.max_insertions,
                num_samples=samples,
                seed=seed + start,
                stop=list(task.stop),
            ),
        )
        texts = [cut_at_stop(c.text, task.stop) for c in out.completions]
        recs = records[start : start + len(chunk)]
        columns = {k: [r.columns.get(k) for r in recs for _ in range(samples)] for k in recs[0].columns}
        rewards += task.reward([r.prompt for r in recs for _ in range(samples)], texts, **columns)
    groups = [rewards[i : i + samples] for i in range(0, len(rewards), samples)]
    return {
        "reward": round(sum(rewards) / len(rewards), 3),
        "informative_groups": round(sum(len(set(g)) > 1 for g in groups) / len(groups), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/real-demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--prompts", type=int, default=16, help="validation prompts per task")
    parser.add_argument("--samples", type=int, default=4, help="G: samples per prompt, as in trigger RL")
    parser.add_argument(
        "--memories",
        nargs="+",
        default=["off", "always"],
        help="memory policies to probe (random:P draws each decision with probability P)",
    )
    parser.add_argument("--tasks", nargs="+", default=["in_domain", "known"], help="validation sets to probe")
    args = parser.parse_args()
    cfg = replace(RealDemoConfig(out=args.out, progress=False).effective(), seed=args.seed)
    base, tokenizer, _ = load_reasoner(cfg)
    seed_dir = Path(args.out) / f"seed-{args.seed}"
    model = real_arms.load_arm("memgen_sft", base, tokenizer, cfg, seed_dir)
    model.eval()
    validation = seed_data(replace(cfg, gsm8k_size=0), args.seed)["validation"]
    rows = []
    with torch.inference_mode():
        for temperature in args.temperatures:
            for name, task in validation.items():
                if name not in args.tasks:
                    continue
                for memory in args.memories:
                    started = time.perf_counter()
                    row = {
                        "temperature": temperature,
                        "task": name,
                        "memory": memory,
                        **probe(
                            model, task, task.records[: args.prompts], temperature, memory, cfg, args.samples, args.seed
                        ),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(json.dumps({"seed": args.seed, "prompts": args.prompts, "samples": args.samples, "rows": rows}))


if __name__ == "__main__":
    main()
