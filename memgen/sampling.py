"""Next-token selection: greedy, temperature, top-k and top-p.

The warpers are applied in the order Hugging Face ``generate`` applies them (temperature,
then top-k, then top-p) and sampling draws one ``torch.multinomial`` over the whole batch,
so with the same seed memgen with memory off reproduces ``model.generate`` token for token.
"""

from __future__ import annotations

import torch


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Return filtered scores (B, V): temperature-scaled, tokens outside top-k / top-p set to -inf."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def select_tokens(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row from float32 logits (B, V)."""
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), the policy that RL trains (before top-k/top-p)."""
    scaled = logits / temperature if temperature != 1.0 else logits
    return scaled.log_softmax(dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
