"""Pretrain the demo's tiny reasoner from scratch on domain A, and cache it by its config.

A character-level tokenizer (no merges, so ``,`` and ``.`` are delimiter tokens of their own)
and a Qwen2-architecture causal LM of about 6M parameters, trained on packed streams of
domain-A and nonce problems, some carrying notes (see :mod:`memgen.demo.domains`). The
precision is the config's (``fp32`` or ``bf16`` autocast, picked by :mod:`memgen.precision`:
bf16 only where the CPU runs it natively) and is part of the cache key, because the two
train to different weights. The result is saved under
``$MEMGEN_CACHE`` (default ``~/.cache/memgen``) in a directory named by a hash of the
config, so later runs skip pretraining; the directory is written atomically. Same seed,
same config, same thread count: same weights.
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
from ..precision import autocast, cpu_capability
from ..loading import load_base
from ..tiny import tiny_causal_lm, tiny_tokenizer
from .domains import ALPHABET, make_problem, with_notes

FORMAT_VERSION = 6


@dataclass(frozen=True)
class ReasonerConfig:
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    max_positions: int = 512
    steps: int = 700
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup: int = 30
    nonce_share: float = 0.4
    nonce_notes: float = 0.8
    a_notes: float = 0.5
    seed: int = 0
    precision: str = "fp32"

    def key(self) -> str:
        text = json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("MEMGEN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memgen")
    return Path(base) / "demo"


def demo_tokenizer():
    return tiny_tokenizer(alphabet=ALPHABET, merges=())


def _stream(rng: random.Random, tokenizer, excluded: set[str], config: ReasonerConfig):
    """An endless stream of (token, label) over domain-A and nonce problems, minus ``excluded``.

    Note tokens are context only: their label is -100, so the reasoner learns to read notes
    and never to write them (see ``domains``).
    """
    eos = tokenizer.eos_token_id
    while True:
        nonce = rng.random() < config.nonce_share
        record = make_problem(rng, "N" if nonce else "A")
        if record.prompt in excluded:
            continue
        noted = rng.random() < (config.nonce_notes if nonce else config.a_notes)
        density = rng.choice([0.5, 1.0]) if noted else 0.0
        for i, (text, is_note) in enumerate(with_notes(record, rng, density, truthful=nonce)):
            for token in tokenizer(text, add_special_tokens=i == 0)["input_ids"]:
                yield token, -100 if is_note else token
        yield eos, eos


def pretrain(config: ReasonerConfig, excluded_prompts: set[str], progress: bool = True, log=print):
    """Train a fresh reasoner; returns (model, tokenizer, stats)."""
    from tqdm.auto import tqdm

    tokenizer = demo_tokenizer()
    model = tiny_causal_lm(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                           num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                           intermediate_size=config.intermediate_size, max_positions=config.max_positions,
                           seed=config.seed)
    model.train()
    stream = _stream(random.Random(f"pretrain:{config.seed}"), tokenizer, excluded_prompts, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress_frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain reasoner on domain A", disable=not progress, dynamic_ncols=True)
    loss_value = float("nan")
    for _ in bar:
        batch = torch.tensor([[next(stream) for _ in range(config.seq_len)] for _ in range(config.batch_size)])
        with autocast(config.precision):
            out = model(input_ids=batch[..., 0], labels=batch[..., 1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(out.loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    seconds = time.perf_counter() - started
    tokens = config.steps * config.batch_size * config.seq_len
    return model, tokenizer, {"precision": config.precision, "cpu_capability": cpu_capability(),
                              "seconds_per_step": seconds / config.steps, "pretrain_seconds": seconds, "pretrain_tokens": tokens,
                              "pretrain_tokens_per_s": tokens / seconds, "final_loss": loss_value}


def get_reasoner(config: ReasonerConfig, excluded_prompts: set[str], progress: bool = True, log=print):
    """The cached reasoner for ``config`` (pretraining it on a miss): (model, tokenizer, info)."""
    directory = cache_root() / f"reasoner-{config.key()}"
    if (directory / "pretrain.json").is_file():
        model, tokenizer = load_base(directory)
        info = json.loads((directory / "pretrain.json").read_text())
        info["cached"] = True
        log(f"reasoner: cached at {directory}")
        return model.eval(), tokenizer, info
    log(f"reasoner: pretraining ({config.steps} steps, {config.precision}); it will be cached at {directory}")
    model, tokenizer, info = pretrain(config, excluded_prompts, progress, log)
    with atomic_directory(directory) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "pretrain.json").write_text(json.dumps({**info, "config": asdict(config)}, indent=2))
    info["cached"] = False
    model, tokenizer = load_base(directory)  # the cached copy, so first and later runs use identical weights
    return model.eval(), tokenizer, info
