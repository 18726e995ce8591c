"""Pretrain the demo's tiny reasoner from scratch on domain A, check its quality, and cache it.

A character-level tokenizer (no merges, so ``,`` and ``.`` are delimiter tokens of their own)
and a small Qwen2-architecture causal LM (about 1M parameters), trained on domain-A and nonce
problems, some carrying notes (see :mod:`memgen.tasks.domains`).

- **Rows hold whole problems.** Each training row is packed with complete problems and padded
  at the end, so no problem is cut from its prompt; the loss covers the solutions (and EOS),
  not the prompts, whose names and numbers are random draws nobody can predict.
- **Small and long, not big and short.** On 2 CPU cores the budget is a number of FLOPs. A 6M
  model got 650 steps of it and reached 0.20-0.26 greedy accuracy on held-out A; a 1M model
  gets 2,000+ steps of the same budget and went from 0.15 to 0.93 between steps 500 and
  1,000 (the algorithm -- find step k's verb and amount, add single digits -- is learnt in a
  jump). See docs/results.md for the measurements.
- **Half nonce problems, every one with notes.** Reading the memory channel is learnt in a
  jump whose timing varied by seed when 40% of problems were nonce and a fifth of those had
  no notes (their signs cannot be learnt, only guessed): seed 1 plateaued at 0.55 note
  reading after 3,500 steps, seed 0 passed 0.9 only at 3,250. With ``nonce_share`` 0.5 and
  ``nonce_notes`` 1.0, seeds 0, 1 and 2 passed both checks by steps 1,500, 1,250 and 1,250
  (fp32, AVX2 kernels; docs/results.md).
- **A quality bar on both skills.** After the schedule, greedy accuracy on held-out domain-A
  problems and on held-out nonce problems with true notes (:func:`note_reading_accuracy`:
  reading the memory channel, learnt later than A) is measured; while either is below
  ``quality_bar`` training continues at the final learning rate in chunks of ``check_every``
  steps, up to ``max_extra_steps``, and then fails loudly. The checks are kept in the cached
  ``pretrain.json``, so a cached reasoner carries its evidence.

The precision is the config's (``fp32`` or ``bf16`` autocast, picked by :mod:`memgen.precision`:
bf16 only where the CPU runs it natively) and is part of the cache key, because the two train
to different weights. The result is saved under ``$MEMGEN_CACHE`` (default ``~/.cache/memgen``)
in a directory named by a hash of the config and of the held-out prompts it must not see, so
later runs skip pretraining; the directory is written atomically. Same seed, same config, same
thread count: same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_directory
from ..errors import QualityBarError
from ..loading import load_base
from ..precision import autocast, cpu_capability
from ..tasks.domains import ALPHABET, answer_reward, make_problem, make_split, note, with_notes
from ..tiny import tiny_causal_lm, tiny_tokenizer

FORMAT_VERSION = 8


@dataclass(frozen=True)
class ReasonerConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 512
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup: int = 30
    nonce_share: float = 0.5
    nonce_notes: float = 1.0
    a_notes: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    quality_bar: float = 0.9
    quality_size: int = 200
    check_every: int = 250
    max_extra_steps: int = 1500

    def key(self, excluded_prompts: set[str] = frozenset()) -> str:
        held_out = hashlib.sha256("\n".join(sorted(excluded_prompts)).encode()).hexdigest()
        text = json.dumps({"v": FORMAT_VERSION, "held_out": held_out, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("MEMGEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memgen"
    )
    return Path(base) / "demo"


def demo_tokenizer():
    return tiny_tokenizer(alphabet=ALPHABET, merges=())


def quality_split(config: ReasonerConfig, excluded: set[str]):
    """Held-out domain-A problems for the quality bar, disjoint from ``excluded`` (the demo's test set)."""
    pool = make_split("A", config.quality_size + len(excluded), f"quality:{config.seed}")
    return [r for r in pool if r.prompt not in excluded][: config.quality_size]


def _examples(rng: random.Random, tokenizer, excluded: set[str], config: ReasonerConfig):
    """Endless (input ids, labels) of single domain-A and nonce problems, minus ``excluded``.

    Labels cover the solution and EOS. Note tokens are context only (label -100), so the
    reasoner learns to read notes and never to write them (see ``domains``).
    """
    eos = tokenizer.eos_token_id
    while True:
        nonce = rng.random() < config.nonce_share
        record = make_problem(rng, "N" if nonce else "A")
        if record.prompt in excluded:
            continue
        noted = rng.random() < (config.nonce_notes if nonce else config.a_notes)
        density = rng.choice([0.5, 1.0]) if noted else 0.0
        ids, labels = [], []
        for i, (text, is_note) in enumerate(with_notes(record, rng, density, truthful=nonce)):
            tokens = tokenizer(text, add_special_tokens=i == 0)["input_ids"]
            ids += tokens
            labels += [-100] * len(tokens) if is_note or i == 0 else tokens
        yield ids + [eos], labels + [eos]


def _rows(examples, tokenizer, config: ReasonerConfig):
    """Batches (input ids, labels) of ``batch_size`` rows, each packed with whole problems and right-padded."""
    pending = next(examples)
    while True:
        rows, targets = [], []
        for _ in range(config.batch_size):
            ids, labels = [], []
            while len(ids) + len(pending[0]) <= config.seq_len:
                ids += pending[0]
                labels += pending[1]
                pending = next(examples)
            pad = config.seq_len - len(ids)
            rows.append(ids + [tokenizer.pad_token_id] * pad)
            targets.append(labels + [-100] * pad)
        # Right padding under a causal mask: no real token attends to a pad, so no mask is needed.
        yield torch.tensor(rows), torch.tensor(targets)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records, batch_size: int = 100, max_new_tokens: int = 40) -> float:
    """Plain greedy accuracy of ``model`` on ``records`` (no memory), stopping at a newline."""
    was_training = model.training
    model.eval()
    newline = tokenizer.convert_tokens_to_ids("\n")
    hits = 0.0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        encoded = tokenizer([r.prompt for r in chunk], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, newline],
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(answer_reward(None, texts, [r.columns["answer"] for r in chunk]))
    model.train(was_training)
    return hits / len(records)


@torch.no_grad()
def decode_with_notes(model, tokenizer, records, seed: int = 0, max_new_tokens: int = 40) -> list[str]:
    """Greedy completions with a true note as text at every insertion point (notes left out of the text).

    As in pretraining (``domains.with_notes``), the note at the prompt end has a random sign and the note
    after the k-th ``,`` gives the sign of step k. Rows are left-padded and recomputed each step (no cache):
    a check run once per pretraining, on a model of about 1M parameters.
    """
    was_training = model.training
    model.eval()
    rngs = [random.Random(f"{seed}:{i}") for i in range(len(records))]  # per row: the batch order is free
    newline, comma = tokenizer.convert_tokens_to_ids("\n"), tokenizer.convert_tokens_to_ids(",")
    notes = {sign: tokenizer(note(sign), add_special_tokens=False)["input_ids"] for sign in "+-"}
    rows = [tokenizer(r.prompt)["input_ids"] + notes[rng.choice("+-")] for r, rng in zip(records, rngs)]
    generated = [[] for _ in records]
    steps_seen = [0] * len(records)
    active = list(range(len(records)))
    for _ in range(max_new_tokens):
        if not active:
            break
        width = max(len(rows[i]) for i in active)
        ids = torch.full((len(active), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for j, i in enumerate(active):
            ids[j, width - len(rows[i]) :] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        still = []
        for j, i in enumerate(active):
            token = int(logits[j].argmax())
            if token in (tokenizer.eos_token_id, newline):
                continue
            rows[i].append(token)
            generated[i].append(token)
            if token == comma:
                signs = records[i].columns["signs"]
                k = steps_seen[i]
                steps_seen[i] += 1
                rows[i] += notes[signs[k] if k < len(signs) else rngs[i].choice("+-")]
            still.append(i)
        active = still
    model.train(was_training)
    return tokenizer.batch_decode(generated)


def note_reading_accuracy(model, tokenizer, records, seed: int = 0) -> float:
    """Accuracy with true notes (:func:`decode_with_notes`): the ceiling of what latents in a note's place can teach."""
    texts = decode_with_notes(model, tokenizer, records, seed)
    return sum(answer_reward(None, texts, [r.columns["answer"] for r in records])) / len(records)


def pretrain(config: ReasonerConfig, excluded_prompts: set[str], progress: bool = True, log=print):
    """Train a fresh reasoner until its quality bar; returns (model, tokenizer, stats).

    Raises :class:`QualityBarError` when ``steps + max_extra_steps`` do not reach the bar.
    """
    from tqdm.auto import tqdm

    tokenizer = demo_tokenizer()
    model = tiny_causal_lm(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_positions=config.max_positions,
        seed=config.seed,
    )
    model.train()
    valid = quality_split(config, excluded_prompts)
    valid_notes = make_split("N", config.quality_size, f"quality-notes:{config.seed}")
    excluded = set(excluded_prompts) | {r.prompt for r in valid + valid_notes}
    batches = _rows(_examples(random.Random(f"pretrain:{config.seed}"), tokenizer, excluded, config), tokenizer, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_frac = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    started = time.perf_counter()
    checks: list[dict] = []
    step, budget = 0, config.steps
    bar = tqdm(total=budget, desc="pretrain reasoner on domain A", disable=not progress, dynamic_ncols=True)
    loss_value = float("nan")
    while True:
        while step < budget:
            ids, labels = next(batches)
            with autocast(config.precision):
                out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(out.loss.detach())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        accuracy = greedy_accuracy(model, tokenizer, valid)
        reading = note_reading_accuracy(model, tokenizer, valid_notes, seed=config.seed)
        checks.append({"step": step, "accuracy_A": accuracy, "note_reading": reading})
        if min(accuracy, reading) >= config.quality_bar:
            break
        if budget + config.check_every > config.steps + config.max_extra_steps:
            bar.close()
            raise QualityBarError(
                f"after {step} steps the demo reasoner has greedy accuracy {accuracy:.3f} on {len(valid)} held-out "
                f"domain-A problems and {reading:.3f} on {len(valid_notes)} nonce problems with true notes, below "
                f"its quality bar {config.quality_bar}; checks: {checks}. Raise --pretrain-steps, or try another "
                "--seed."
            )
        log(
            f"reasoner: after {step} steps, held-out A {accuracy:.3f}, note reading {reading:.3f}: below the bar "
            f"{config.quality_bar}; training {config.check_every} more"
        )
        budget += config.check_every
        bar.total = budget
    bar.close()
    model.eval()
    seconds = time.perf_counter() - started
    tokens = step * config.batch_size * config.seq_len
    quality = {
        "accuracy_A": accuracy,
        "note_reading": reading,
        "bar": config.quality_bar,
        "n": len(valid),
        "met": True,
        "checks": checks,
    }
    return (
        model,
        tokenizer,
        {
            "precision": config.precision,
            "cpu_capability": cpu_capability(),
            "steps": step,
            "seconds_per_step": seconds / step,
            "pretrain_seconds": seconds,
            "pretrain_tokens": tokens,
            "pretrain_tokens_per_s": tokens / seconds,
            "final_loss": loss_value,
            "quality": quality,
        },
    )


def get_reasoner(config: ReasonerConfig, excluded_prompts: set[str], progress: bool = True, log=print):
    """The cached reasoner for ``config`` (pretraining it on a miss): (model, tokenizer, info)."""
    directory = cache_root() / f"reasoner-{config.key(excluded_prompts)}"
    if (directory / "pretrain.json").is_file():
        model, tokenizer = load_base(directory)
        info = json.loads((directory / "pretrain.json").read_text())
        info["cached"] = True
        quality = info["quality"]
        log(
            f"reasoner: cached at {directory} (held-out A {quality['accuracy_A']:.2f}, note reading "
            f"{quality['note_reading']:.2f}, bar {quality['bar']})"
        )
        return model.eval(), tokenizer, info
    log(
        f"reasoner: pretraining ({config.steps} steps, {config.precision}, quality bar {config.quality_bar} on "
        f"held-out A and note reading); it will be cached at {directory}"
    )
    model, tokenizer, info = pretrain(config, excluded_prompts, progress, log)
    log(
        f"reasoner: after {info['steps']} steps, held-out A {info['quality']['accuracy_A']:.2f}, note reading "
        f"{info['quality']['note_reading']:.2f} (bar {config.quality_bar})"
    )
    with atomic_directory(directory) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "pretrain.json").write_text(json.dumps({**info, "config": asdict(config)}, indent=2))
    info["cached"] = False
    model, tokenizer = load_base(directory)  # the cached copy, so first and later runs use identical weights
    return model.eval(), tokenizer, info
