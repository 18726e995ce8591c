"""``memgen demo``: the end-to-end offline MemGen experiment on a laptop CPU.

1. Pretrain (or load from cache) a ~6M-parameter character-level Qwen2 reasoner on domain A.
2. Train every arm on the same domain-B problems with the same step budget.
3. Evaluate every arm, greedy and seeded, on held-out problems of A (forgetting), B (the new
   skill) and C (held-out cross-domain): accuracy, insertions per answer, decode time.
4. Print a table; write ``results.json``, ``report.md`` and PNG plots to ``--out``.

``--quick`` runs the same pipeline with a smaller reasoner and budgets (for CI, < 3 min).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..dataclass_cli import check_ranges, help_field
from ..evaluate import EvalConfig, evaluate, format_table
from ..precision import check_precision, cpu_capability, cpu_has_native_bf16, resolve_precision
from . import arms as arm_fns
from .domains import NOTE_WIDTH, as_task, disjoint_splits
from .reasoner import ReasonerConfig, get_reasoner

DOMAINS = {"A": "A (pretraining skill)", "B": "B (new skill)", "C": "C (held-out mix)"}


@dataclass
class DemoConfig:
    out: str = help_field("runs/demo", "output directory for results.json, report.md and plots")
    quick: bool = help_field(False, "smaller reasoner and budgets (CI smoke run, < 3 minutes)")
    seed: int = help_field(0, "seed for data, training and decoding", ge=0)
    train_size: int = help_field(2000, "domain-B training problems", ge=1)
    test_size: int = help_field(100, "held-out problems per domain", ge=1)
    sft_steps: int = help_field(150, "optimizer steps for every SFT arm (same budget for all)", ge=1)
    batch_size: int = help_field(16, "SFT batch size (same for all SFT arms)", ge=1)
    latents: int = help_field(NOTE_WIDTH, "K latents per insertion", ge=1)
    lora_r: int = help_field(8, "LoRA rank of both the weaver and the LoRA-SFT baseline", ge=1)
    latent_positions: str = help_field("advance", "position ids of latents: advance (paper) | tied")
    latent_init_text: str = help_field("<::>", "text whose token embeddings new latents start at: the frame of "
                                                "the reasoner's note channel, with no sign in it")
    delimiters: str = help_field(",", "characters after which memory may be woven (the , ending each step)")
    weaver_lr: float = help_field(1e-2, "weaver learning rate", gt=0)
    lora_lr: float = help_field(3e-3, "LoRA-SFT learning rate", gt=0)
    max_insertions: int = help_field(8, "cap on in-reasoning insertions per answer", ge=0)
    trigger_steps: int = help_field(30, "trigger RL steps", ge=1)
    trigger_lr: float = help_field(3e-2, "trigger learning rate", gt=0)
    sparsity_lambda: float = help_field(0.05, "λ of the trigger's sparsity penalty", ge=0)
    grpo_steps: int = help_field(20, "weaver GRPO steps after SFT", ge=1)
    grpo_lr: float = help_field(3e-4, "weaver GRPO learning rate", gt=0)
    rl_batch_size: int = help_field(8, "prompts per RL step", ge=1)
    num_generations: int = help_field(4, "rollouts per prompt in RL", ge=2)
    max_new_tokens: int = help_field(48, "longest answer", ge=1)
    eval_batch_size: int = help_field(50, "answers decoded together at evaluation", ge=1)
    pretrain_steps: int = help_field(650, "reasoner pretraining steps (cached by config)", ge=1)
    pretrain_precision: str = help_field("auto", "reasoner pretraining precision: auto (bf16 only where the CPU "
                                                 "runs it natively, else fp32) | fp32 | bf16")
    progress: bool = help_field(True, "show progress bars")

    def __post_init__(self) -> None:
        check_ranges(self)
        check_precision(self.pretrain_precision, "pretrain_precision")

    def effective(self) -> "DemoConfig":
        if not self.quick:
            return self
        return replace(self, train_size=200, test_size=20, sft_steps=12, batch_size=8, trigger_steps=3,
                       grpo_steps=2, rl_batch_size=2, num_generations=2, pretrain_steps=40)

    def reasoner(self, precision: str) -> ReasonerConfig:
        if self.quick:
            return ReasonerConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                                  steps=self.pretrain_steps, batch_size=8, seq_len=128, seed=self.seed,
                                  precision=precision)
        return ReasonerConfig(steps=self.pretrain_steps, seed=self.seed, precision=precision)


def run_demo(config: DemoConfig) -> dict:
    cfg = config.effective()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("runs", "adapters", "answers"):  # a re-run replaces the previous run's arms
        shutil.rmtree(out / stale, ignore_errors=True)
    started = time.perf_counter()
    log = print
    torch.manual_seed(cfg.seed)

    tests = {d: disjoint_splits(d, {"test": cfg.test_size}, cfg.seed + 1)["test"] for d in DOMAINS}
    b_train = disjoint_splits("B", {"test": cfg.test_size, "train": cfg.train_size}, cfg.seed + 1)["train"]
    held_out = {r.prompt for r in tests["B"]}
    assert not held_out & {r.prompt for r in b_train}
    train_task = as_task("B-train", b_train)

    precision = resolve_precision(cfg.pretrain_precision)
    log(f"reasoner precision: {precision.precision} ({precision.reason})")
    base, tokenizer, reasoner_info = get_reasoner(cfg.reasoner(precision.precision), {r.prompt for r in tests["A"]},
                                                  cfg.progress, log)
    reasoner_info["precision_choice"] = precision.as_dict()
    reasoner_info["params"] = sum(p.numel() for p in base.parameters())

    results = []
    arms = {}
    order = ["vanilla", "lora_sft", "memgen_sft", "memgen_trigger", "memgen_random", "prompt_only", "memgen_grpo"]
    for index, name in enumerate(order):
        fn = getattr(arm_fns, name)
        # Each arm gets its own seed, so its initial weaver/trigger does not depend on which arms ran before.
        torch.manual_seed(cfg.seed * len(order) + index)
        log(f"arm {name}: training")
        if name in ("memgen_trigger", "memgen_random", "memgen_grpo"):
            arm = fn(base, tokenizer, cfg, train_task, out, arms["memgen_sft"])
        else:
            arm = fn(base, tokenizer, cfg, train_task, out)
        arms[name] = arm
        row = {"arm": name, "memory": arm.memory, "trainable_params": arm.trainable_params,
               "train_seconds": round(arm.train_seconds, 1), "domains": {}}
        for domain in DOMAINS:
            eval_config = EvalConfig(memory=arm.memory, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.eval_batch_size, max_insertions=arm.eval_overrides.get(
                                         "max_insertions", cfg.max_insertions), seed=cfg.seed,
                                     output=str(out / "answers" / f"{name}-{domain}.jsonl"), progress=cfg.progress)
            summary = evaluate(arm.model, as_task(domain, tests[domain]), eval_config)
            row["domains"][domain] = {k: summary[k] for k in ("accuracy", "mean_insertions", "invocation_rate",
                                                             "seconds_per_answer", "n")}
        results.append(row)
        log(f"arm {name}: " + ", ".join(f"{d}={row['domains'][d]['accuracy']:.2f}" for d in DOMAINS))

    total = time.perf_counter() - started
    payload = {
        "config": asdict(cfg), "reasoner": reasoner_info, "arms": results, "total_seconds": round(total, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_capability": cpu_capability(),
                    "native_bf16": cpu_has_native_bf16()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    table = results_table(results)
    write_plots(results, out)
    write_report(payload, table, out)
    print()
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'accuracy.png'}, {out / 'invocation.png'} "
          f"in {total:.0f} s")
    return payload


def results_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        row = {"arm": r["arm"], "memory": r["memory"], "trainable": r["trainable_params"]}
        for d in DOMAINS:
            row[f"acc {d}"] = r["domains"][d]["accuracy"]
        b = r["domains"]["B"]
        row["ins/answer B"] = b["mean_insertions"]
        row["invoke rate B"] = "-" if b["invocation_rate"] is None else round(b["invocation_rate"], 3)
        row["ms/answer B"] = round(1000 * b["seconds_per_answer"], 1)
        row["train s"] = r["train_seconds"]
        rows.append(row)
    return format_table(rows, list(rows[0]))


def write_plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["arm"] for r in results]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.26
    for i, domain in enumerate(DOMAINS):
        values = [r["domains"][domain]["accuracy"] for r in results]
        bars = ax.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=DOMAINS[domain])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (held-out, greedy)")
    ax.set_title("MemGen demo: accuracy by arm and domain")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    insertions = [r["domains"]["B"]["mean_insertions"] for r in results]
    rates = [r["domains"]["B"]["invocation_rate"] or 0.0 for r in results]
    left.bar(names, insertions, color="tab:purple")
    left.set_title("latent insertions per answer (domain B)")
    right.bar(names, rates, color="tab:green")
    right.set_ylim(0, 1.05)
    right.set_title("invocation rate at delimiters (domain B)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "invocation.png", dpi=120)
    plt.close(fig)


def write_report(payload: dict, table: str, out: Path) -> None:
    cfg, info = payload["config"], payload["reasoner"]
    origin = "loaded from cache" if info.get("cached") else f"pretrained in {info['pretrain_seconds']:.0f} s"
    lines = [
        "# MemGen demo report",
        "",
        f"Reasoner: {info['params'] / 1e6:.1f}M-parameter character-level Qwen2 pretrained on domain A "
        f"({origin}). "
        f"Every arm trains on the same {cfg['train_size']} domain-B problems for {cfg['sft_steps']} steps "
        f"of batch {cfg['batch_size']} (RL arms continue from the SFT weaver). Evaluation: {cfg['test_size']} "
        "held-out problems per domain, greedy.",
        "",
        "- A: pretraining skill (verbs gets/loses); B: new skill (verbs finds/drops, unseen by the reasoner); "
        "C: held-out three-step problems mixing both.",
        "",
        table,
        "",
        "![accuracy by arm and domain](accuracy.png)",
        "",
        "![insertions and invocation rate](invocation.png)",
        "",
        f"Total time: {payload['total_seconds']:.0f} s on {payload['machine']['threads']} threads, CPU capability "
        f"{payload['machine']['cpu_capability']}; reasoner pretrained in {info.get('precision', 'fp32')}.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
