"""The memory trigger: a small MLP on the reasoner's last-layer hidden state at a delimiter.

The paper's trigger is its own LoRA-adapted pass over the context; the authors' code runs it
as a whole extra LLM forward. Here it reads the hidden state the reasoner already computed
for the delimiter token, so a decision costs one tiny MLP and no extra model forward.

The head centres and scales its input with statistics measured on the decision states of the
first trigger-RL rollouts (``calibrate``), as RL libraries normalise observations. Why: a
reasoner's hidden states share a large common component, and a policy-gradient step on raw
states moves every state's logit together along it. On the demo
that saturated the head to always- or never-invoke within 10-15 steps, although a linear
probe separates the states where memory helps from those where it hurts. Until calibrated
the statistics are the identity; the output layer starts at zero, so calibrating an
untrained head changes no decision.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

TRIGGER_STATS = ("input_mean", "input_scale", "calibrated")
"""Buffers added after the first release; an adapter without them loads with the identity."""


class TriggerHead(nn.Module):
    """Maps hidden states (..., d) to invoke logits (...,); P(invoke) = sigmoid(logit). ``width`` 0: linear."""

    def __init__(self, hidden_size: int, width: int, init_prob: float = 0.5) -> None:
        super().__init__()
        layers = (
            [nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1)] if width else [nn.Linear(hidden_size, 1)]
        )
        self.net = nn.Sequential(*layers)
        # Zero output weights: every state starts at exactly init_prob, so RL begins unbiased.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(init_prob / (1.0 - init_prob)))
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_scale", torch.ones(hidden_size))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self._recorded: list[torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._recorded is not None:
            self._recorded.append(hidden.detach().reshape(-1, hidden.shape[-1]).float())
        dtype = self.net[0].weight.dtype
        x = (hidden.to(self.input_mean.dtype) - self.input_mean) / self.input_scale
        return self.net(x.to(dtype)).squeeze(-1).float()

    @contextmanager
    def recording(self):
        """Collect every state the head reads inside the block; yields the list they go to."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    @property
    def untrained(self) -> bool:
        """True while the output layer is still zero: every state gets the same probability."""
        return not bool(self.net[-1].weight.any())

    @torch.no_grad()
    def start_at(self, prob: float) -> None:
        """Make an untrained head give ``prob`` for every state (its output bias); a trained head refuses."""
        if not self.untrained:
            raise ValueError("start_at is for an untrained head: this one has learnt weights")
        self.net[-1].bias.fill_(math.log(prob / (1.0 - prob)))

    @torch.no_grad()
    def calibrate(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3) -> None:
        """Standardise inputs with this mean (d,) and std (a scalar or (d,)); marks the head calibrated."""
        self.input_mean.copy_(mean.float())
        # A feature that never varies keeps its raw scale instead of being blown up by 1/eps.
        std = torch.as_tensor(std, dtype=torch.float32, device=self.input_scale.device).expand_as(self.input_scale)
        self.input_scale.copy_(torch.where(std > eps, std, torch.ones_like(std)))
        self.calibrated.fill_(True)
