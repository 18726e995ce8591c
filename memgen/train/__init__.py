"""Training entry points: ``train_weaver`` (SFT or GRPO) and ``train_trigger`` (RL with the sparsity penalty).

Both take their typed config, run under accelerate (``accelerate launch`` for several
processes), and return the final adapter directory (``<output_dir>/final``).
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, TriggerTrainConfig, WeaverTrainConfig
from .runner import Run, latest_checkpoint


def train_weaver(config: WeaverTrainConfig, model=None, task=None, reward_fn=None) -> Path:
    """Weaver SFT or GRPO. ``model`` / ``task`` / ``reward_fn`` override what ``config`` would load."""
    from .grpo import grpo_step

    run = Run(config, "weaver", model=model, task=task)
    if config.method == "sft":
        return run.train(run.task.sft_step)
    run.reward_fn = reward_fn or run.task.reward_function(config)
    return run.train(grpo_step)


def train_trigger(config: TriggerTrainConfig, model=None, task=None, reward_fn=None) -> Path:
    """Trigger RL with the weaver frozen; ``model`` must carry the trained weaver (or pass ``--adapter``)."""
    from ..errors import ConfigError
    from .trigger_rl import trigger_step

    if model is None and not config.adapter:
        raise ConfigError("trigger training needs the trained weaver: pass --adapter DIR")
    run = Run(config, "trigger", model=model, task=task)
    run.reward_fn = reward_fn or run.task.reward_function(config)
    return run.train(trigger_step)


__all__ = [
    "TrainConfig",
    "WeaverTrainConfig",
    "TriggerTrainConfig",
    "train_weaver",
    "train_trigger",
    "latest_checkpoint",
]
