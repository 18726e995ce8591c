"""Weaver SFT: the step lives with each task (:meth:`memgen.tasks.protocol.TaskProtocol.sft_step`).

Answer tasks' step, :func:`memgen.tasks.answering.sft_step`, is re-exported here with its example
builder; :func:`sft_eval_loss` scores held-out examples without gradients.
"""

from __future__ import annotations

import torch

from ..tasks.answering import sft_example, sft_step

__all__ = ["sft_example", "sft_step", "sft_eval_loss"]


def sft_eval_loss(model, examples) -> float:
    """Token-mean NLL of (prompt, completion, insertions) examples without gradients."""
    prompts, completions, insertions = map(list, zip(*examples))
    with torch.no_grad():
        out = model.teacher_forced(prompts, completions, insertions)
    return float(-(out.logprobs * out.mask).sum() / out.mask.sum())
