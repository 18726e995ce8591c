"""Scoring given continuations under a memory policy (forced decoding).

``teacher_forced`` scores a completion with insertions at positions the caller names.
Likelihood evaluation (lm-eval's ``loglikelihood``) needs the positions the *policy* would choose
while reading the continuation: always-on weaves at its delimiters; the trigger decides left to
right on the states the reasoner actually has, latents woven earlier included. Forced decoding
runs the decoding engine with the continuation's tokens fed instead of chosen ones, so every
decision is the one a rollout that produced these tokens would make.

Proven three ways (``tests/test_forced.py``): with memory off the log-probs equal the plain
causal LM's (HF forward); with memory always they equal ``teacher_forced`` at the insertion
points forced decoding reports; under the trigger, its insertions equal those of a greedy
rollout that produced the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import GenerateConfig
from .engine import DecodeSession, Insertion


@dataclass
class ForcedScore:
    """One continuation's scores: per-token log-probs (temperature 1), argmax flags, and the insertions made."""

    token_logprobs: list[float]
    greedy: list[bool]
    insertions: list[Insertion]

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def is_greedy(self) -> bool:
        """True when every continuation token was the most likely one (lm-eval's ``is_greedy``)."""
        return all(self.greedy)

    @property
    def num_insertions(self) -> int:
        return sum(1 for i in self.insertions if i.inserted)


def score_continuations(
    model, prompts, continuations: list[list[int]], config: GenerateConfig | None = None, experience=None
) -> list[ForcedScore]:
    """Score ``continuations[i]`` after ``prompts[i]`` (strings or token ids) under ``config``'s memory policy.

    Sampling, stop strings and EOS do not apply: every continuation token is fed. Insertion
    decisions under a sampled trigger or ``random:P`` draw from the config's seed, as in decoding.
    """
    base = config or GenerateConfig()
    longest = max((len(c) for c in continuations), default=1)
    cfg = replace(
        base,
        max_new_tokens=max(1, longest),
        do_sample=False,
        temperature=1.0,
        stop=[],
        num_samples=1,
        return_logprobs=True,
        output_logits=False,
    )
    session = DecodeSession(model, model.encode_prompts(prompts), cfg, experience=experience, forced=continuations)
    for _ in session:
        pass
    return [
        ForcedScore(c.logprobs, greedy, c.insertions)
        for c, greedy in zip(session.output.completions, session.forced_greedy)
    ]
