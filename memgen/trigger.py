"""The memory trigger: a small MLP on the reasoner's last-layer hidden state at a delimiter.

The paper's trigger is its own LoRA-adapted pass over the context; the authors' code runs it
as a whole extra LLM forward. Here it reads the hidden state the reasoner already computed
for the delimiter token, so a decision costs one tiny MLP and no extra model forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TriggerHead(nn.Module):
    """Maps hidden states (..., d) to invoke logits (...,); P(invoke) = sigmoid(logit)."""

    def __init__(self, hidden_size: int, width: int, init_prob: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))
        # Zero output weights: every state starts at exactly init_prob, so RL begins unbiased.
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, math.log(init_prob / (1.0 - init_prob)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        return self.net(hidden.to(dtype)).squeeze(-1).float()
