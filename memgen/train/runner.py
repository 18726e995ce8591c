"""The training loop every method shares: accelerate setup, data order, optimisation, checkpoints, metrics.

Methods plug in a ``step(run, micro_index) -> (loss, metrics)`` function (see ``sft.py``,
``grpo.py``, ``trigger_rl.py``). The runner owns everything that makes runs reproducible and
resumable:

- Data order: each epoch is a permutation seeded by (seed, epoch); a global micro-batch of
  ``per_device_batch_size * world_size`` records is split across processes by rank, so
  a 2-process run sees the same examples per step as 1 process with the doubled batch.
- Checkpoints (``checkpoint-NNNNNN/``) hold the adapter, optimizer, scheduler, RNG states,
  the data position and any method state; they are written to a scratch directory and
  renamed into place, so a killed run never leaves a half-written checkpoint.
- The LR scheduler is stepped once per optimizer step by the runner (not by accelerate,
  which steps it once per process), so schedules do not depend on the process count.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from ..checkpoint import atomic_directory, atomic_torch_save
from ..data import Record, prompt_token_ids
from ..errors import ConfigError
from ..loading import load_base
from ..model import MemGen
from ..precision import resolve_base_dtype, warn_if_bf16_emulated
from ..tasks import Task, load_named_task
from .logging import MetricsLogger

STATE_FILE = "trainer_state.pt"
RANKS_DIR = "ranks"
# Settings that may differ on --resume: they change what is shown or kept, not what is computed.
# code_workers only sets how many sandboxed programs run at once, not what they return.
RESUME_FREE_FIELDS = (
    "resume",
    "progress",
    "tensorboard",
    "save_every",
    "save_total_limit",
    "log_every",
    "code_workers",
    "gradient_checkpointing",  # the same gradients, so a run that ran out of memory may resume with it on
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory in ``output_dir``, if any."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()
    )
    return found[-1][1] if found else None


def _lr_lambda(config) -> Callable[[int], float]:
    warmup, total, kind = config.warmup_steps, config.max_steps, config.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _load_task(config):
    """The config's task: prompts and a reward, or for agent tasks the training split's episodes."""
    return load_named_task(config, env_split="train", limit=config.limit)


class Run:
    """One training run. ``trainable`` is 'weaver' or 'trigger'; the other groups stay frozen."""

    def __init__(self, config, trainable: str, model: MemGen | None = None, task: Task | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.config = config
        if config.mixed_precision == "bf16":  # honoured, but warned about where bf16 would be emulated
            warn_if_bf16_emulated("cuda" if torch.cuda.is_available() else "cpu")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=not torch.cuda.is_available(),
            # Inference queries get no gradient in a micro-batch without in-reasoning insertions.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)
        if model is None:
            dtype, _ = resolve_base_dtype(config.base_dtype, self.accelerator.device)
            base, tokenizer = load_base(config.model, dtype=dtype)
            if config.adapter:
                model = MemGen.from_pretrained(config.adapter, base, tokenizer)
            else:
                model = MemGen(base, tokenizer, config.memgen_config())
        model.to(self.accelerator.device)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.experience = None
        if config.experience:
            from ..experience.weaving import open_reader

            self.experience = open_reader(config, model)
        self.task = task or _load_task(config)
        self.records: list[Record] = self.task.records
        params = model.weaver_parameters() if trainable == "weaver" else model.trigger_parameters()
        frozen = model.trigger_parameters() if trainable == "weaver" else model.weaver_parameters()
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.trainable = trainable
        self.parameters = params
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped: MemGen = self.accelerator.unwrap_model(self.model)
        self.unwrapped.train()
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.global_batch = config.per_device_batch_size * self.world
        if self.global_batch > len(self.records):
            raise ConfigError(
                f"a global batch of {self.global_batch} records needs at least that many records; "
                f"{config.data} has {len(self.records)}"
            )
        self.state = {"step": 0, "epoch": 0, "position": 0, "method": {}}
        self.output_dir = Path(config.output_dir)
        if config.resume:
            self._resume()
        elif latest_checkpoint(self.output_dir) is not None:  # every rank checks, so none waits on a raised one
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints; pass --resume to continue or choose another --output-dir"
            )
        # Rows logged after the step we start from are dropped: those steps run (again) now. A fresh
        # run starts at 0, so rows left by an earlier attempt that died before its first checkpoint go too.
        self.logger = MetricsLogger(
            self.output_dir, config.tensorboard, self.accelerator.is_main_process, resume_step=self.state["step"]
        )

    # ------------------------------------------------------------------ data
    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.records), generator=gen).tolist()

    def next_batch(self) -> tuple[list[Record], list[int]]:
        """This process's records of the next global micro-batch, and their global indices."""
        if self.state["position"] + self.global_batch > len(self.records):
            self.state["epoch"] += 1
            self.state["position"] = 0
        order = self._order(self.state["epoch"])
        start = self.state["position"] + self.rank * self.config.per_device_batch_size
        indices = order[start : start + self.config.per_device_batch_size]
        self.state["position"] += self.global_batch
        return [self.records[i] for i in indices], indices

    # ------------------------------------------------------------------ helpers for methods
    def encode_prompt(self, record: Record) -> list[int]:
        """A record's prompt ids (through the chat template with ``use_chat_template``), truncated from the left."""
        ids = prompt_token_ids(record, self.unwrapped.tokenizer, self.config.use_chat_template)
        return ids[-self.config.max_prompt_tokens :]

    def global_sum(self, value: float | torch.Tensor) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device).detach().clone()
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def global_mean_std(self, values: torch.Tensor) -> tuple[float, float]:
        """Mean and (population) std of ``values`` over every process's rows."""
        n = self.global_sum(values.numel())
        mean = self.global_sum(values.sum()) / n
        square = self.global_sum((values.double() ** 2).sum()) / n
        return mean, max(0.0, square - mean**2) ** 0.5

    def rollout_seed(self, micro: int) -> int:
        return (self.config.seed * 1_000_003 + self.state["step"] * 101 + micro) * 17 + self.rank

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        """What differs between processes: method state (e.g. GRPO's cached rollouts) and RNG streams."""
        return {
            "method": self.state["method"],
            "rank": self.rank,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> Path | None:
        """Every rank writes its own state, then the main process assembles the checkpoint and renames it in."""
        acc = self.accelerator
        acc.wait_for_everyone()
        step = self.state["step"]
        path = self.output_dir / f"checkpoint-{step:06d}"
        staging = self.output_dir / f".ranks-{step:06d}"
        staging.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self._rank_state(), staging / f"rank-{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            with atomic_directory(path) as scratch:
                self.unwrapped.save_pretrained(scratch / "adapter")
                torch.save(
                    {
                        "state": {k: v for k, v in self.state.items() if k != "method"},
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "config": asdict(self.config),
                        "world_size": self.world,
                    },
                    scratch / STATE_FILE,
                )
                shutil.move(str(staging), str(scratch / RANKS_DIR))
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return path

    def _prune_checkpoints(self) -> None:
        found = sorted(p for p in self.output_dir.iterdir() if _CHECKPOINT.match(p.name))
        for old in found[: max(0, len(found) - self.config.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def _check_resume_settings(self, saved: dict, path: Path) -> None:
        """Refuse settings that would make the resumed run differ from an uninterrupted one."""
        now = asdict(self.config)
        free = set(RESUME_FREE_FIELDS)
        if self.config.lr_scheduler == "constant" and self.config.warmup_steps <= saved["state"]["step"]:
            free.add("max_steps")  # extending a constant-LR run changes nothing already run
        defaults = {f.name: f.default for f in fields(self.config)}
        # A field added after the checkpoint was written counts as unchanged at its default.
        changed = [
            f"{name}: {saved['config'].get(name)!r} in the checkpoint, {value!r} now"
            for name, value in now.items()
            if name not in free
            and saved["config"].get(name, defaults.get(name) if name not in saved["config"] else None) != value
        ]
        if saved.get("world_size", 1) != self.world:
            changed.append(f"processes: {saved.get('world_size', 1)} in the checkpoint, {self.world} now")
        if changed:
            raise ConfigError(
                f"--resume from {path} with changed settings would not continue the same run: "
                + "; ".join(changed)
                + ". Resume with the checkpoint's settings (see "
                f"{self.output_dir / 'config.yaml'}) or start a new --output-dir"
            )

    def _resume(self) -> None:
        path = latest_checkpoint(self.output_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {self.output_dir}")
        saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        self._check_resume_settings(saved, path)
        rank_file = path / RANKS_DIR / f"rank-{self.rank}.pt"
        if not rank_file.is_file():
            raise ConfigError(f"--resume: {path} has no state for process {self.rank} ({rank_file} is missing)")
        mine = torch.load(rank_file, map_location="cpu", weights_only=False)
        self.unwrapped.load_adapter(path / "adapter")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = {**saved["state"], "method": mine["method"]}
        rng = mine["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = path
        if self.accelerator.is_main_process:
            print(f"memgen: resumed from {path} at step {self.state['step']}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ loop
    def train(self, step_fn) -> Path:
        """Run ``step_fn`` until ``max_steps``; returns the final adapter directory."""
        from tqdm.auto import tqdm

        config, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
        bar = tqdm(
            total=config.max_steps,
            initial=self.state["step"],
            disable=not (config.progress and acc.is_main_process),
            desc=f"train {self.trainable}",
            dynamic_ncols=True,
        )
        while self.state["step"] < config.max_steps:
            started = time.perf_counter()
            totals: dict[str, float] = {}
            for micro in range(config.gradient_accumulation_steps):
                with acc.accumulate(self.model):
                    # The step calls the unwrapped model's methods (teacher_forced, generate), which the
                    # prepared model's autocast wrapper never sees: --mixed-precision was a no-op before.
                    with acc.autocast():
                        loss, metrics = step_fn(self, micro)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.parameters, config.max_grad_norm or float("inf"))
                        metrics["grad_norm"] = float(grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / config.gradient_accumulation_steps
            self.scheduler.step()
            self.state["step"] += 1
            elapsed = time.perf_counter() - started
            if "tokens" in totals:
                totals["tokens_per_s"] = totals["tokens"] * config.gradient_accumulation_steps / elapsed
            totals["lr"] = self.scheduler.get_last_lr()[0]
            totals["step_seconds"] = elapsed
            step = self.state["step"]
            if step % config.log_every == 0 or step == config.max_steps:
                self.logger.log(step, totals)
            bar.update(1)
            bar.set_postfix({k: f"{totals[k]:.3g}" for k in ("loss", "reward_mean", "invocation_rate") if k in totals})
            if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        final = self.output_dir / "final"
        if acc.is_main_process:
            self.unwrapped.save_pretrained(final)
        acc.wait_for_everyone()
        self.logger.close()
        return final
