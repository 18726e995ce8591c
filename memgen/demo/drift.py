"""How far a trained arm's output distribution moved from the unchanged model on general prompts.

Accuracy on one known task shows forgetting only where that task looks. This measures change
everywhere the prompts reach: the mean per-token KL(vanilla || arm) over held-out everyday chat
prompts (:data:`GENERAL_PROMPTS`, written for this measure: no arm trains on anything like
them; the offline TriviaQA sample holds a single question, too few), estimated on answers
*sampled from the unchanged model*. Each answer is teacher-forced under the vanilla model and under the arm, and
the per-token estimator ``k3 = r - 1 - log r`` with ``r = p_arm / p_vanilla`` (unbiased for
KL(vanilla || arm) under vanilla's samples, never negative, lower variance than ``-log r``) is
averaged over every answer token. ``k1 = -log r`` is reported beside it.

Latents go where the arm would weave them on that answer: nowhere (memory off, LoRA), at the
prompt end only (prompt-only latents), at the prompt end and every delimiter up to the cap
(memory always), or where the trained trigger decides. A trigger decision at one delimiter
depends on the latents woven before it, so the trigger's insertions are found by iterating
"teacher-force with the current insertions, re-read every decision" until nothing changes:
after pass j the first j decisions equal the sequential ones, so the fixed point is exactly
what the trigger would do while reading this answer (it converges in 2 passes when the trigger
stays quiet, and never takes more passes than the answer has delimiters).
"""

from __future__ import annotations

import torch

from ..model import MemGen

# Everyday requests of the kinds chat models get: advice, explanation, writing, lists, small talk.
GENERAL_PROMPTS = [
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
    "What should I pack for a weekend camping trip?",
    "Explain what a computer virus is to a child.",
    "Suggest a name for a friendly orange cat.",
    "How do I make a cup of green tea?",
    "Write a thank-you note to a neighbour who watered my plants.",
    "What are some fun things to do on a rainy day?",
    "Describe a sunset in two sentences.",
    "How can I stay focused while studying?",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of drinking water?",
    "How do plants make their food?",
    "Give me a simple recipe for pancakes.",
    "What is a good way to start a conversation with someone new?",
    "Explain why exercise is good for the heart.",
    "Write a two-sentence story about a lost key.",
    "What are the planets in our solar system?",
    "How do I politely decline an invitation?",
    "Why do leaves change colour in the fall?",
    "Suggest three hobbies that cost little money.",
    "What does a librarian do?",
    "Write a short motivational message for a friend starting a new job.",
    "How does a rainbow form?",
    "List some healthy snacks for children.",
    "What is the purpose of a seatbelt?",
    "Describe your ideal weekend in a few sentences.",
    "How can I reduce waste at home?",
    "Why do we have seasons?",
]


def sample_reference(model: MemGen, prompt_ids: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    """Answers sampled (temperature 1) from ``model`` with memory off; the ones with at least 2 tokens."""
    out = model.generate(
        prompt_ids, memory="off", do_sample=True, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed
    )
    return [c.token_ids for c in out.completions]


def _trigger_insertions(model: MemGen, prompts, completions, cap: int, prompt_end: bool) -> list[list[int]]:
    candidates = [model.delimiter_positions(c, prompt_end=False) for c in completions]
    decided = [[0] if prompt_end else [] for _ in prompts]
    for _ in range(max(map(len, candidates), default=0) + 2):
        with torch.no_grad():
            out = model.teacher_forced(prompts, completions, decided)
        new = []
        for row, points in enumerate(candidates):
            first = []
            if prompt_end and (not model.config.trigger_at_prompt_end or out.prompt_trigger_logits[row] >= 0):
                first = [0]
            fires = [p for p in points if out.trigger_logits[row, p - 1] >= 0][:cap]
            new.append(first + fires)
        if new == decided:
            return decided
        decided = new
    raise RuntimeError("trigger insertions did not reach a fixed point")  # cannot happen: see the module docstring


def insertions_for(model: MemGen, memory: str, prompts, completions, cap: int) -> list[list[int]]:
    """Where ``model`` with ``memory`` (off | prompt_end | always | trigger) weaves on each fixed answer."""
    if memory == "off":
        return [[] for _ in prompts]
    if memory == "prompt_end":
        return [[0] for _ in prompts]
    if memory == "always":
        return [[0] + model.delimiter_positions(c, prompt_end=False)[:cap] for c in completions]
    if memory == "trigger":
        return _trigger_insertions(model, prompts, completions, cap, prompt_end=True)
    raise ValueError(f"memory must be off, prompt_end, always or trigger; got {memory!r}")


def token_logprobs(model: MemGen, prompts, completions, insertions, batch_size: int = 16) -> list[torch.Tensor]:
    """Per answer, the log-prob of each of its tokens under ``model`` with latents at ``insertions``."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        with torch.no_grad():
            out = model.teacher_forced(prompts[part], completions[part], insertions[part])
        for lp, mask in zip(out.logprobs.float(), out.mask):
            rows.append(lp[mask])
    return rows


def kl_from_reference(reference: list[torch.Tensor], arm: list[torch.Tensor]) -> dict:
    """Mean per-token k3 and k1 estimates of KL(reference || arm) from matching per-token log-probs."""
    ref, new = torch.cat(reference).double(), torch.cat(arm).double()
    log_r = new - ref
    k3 = log_r.exp() - 1 - log_r
    return {"kl": round(float(k3.mean()), 5), "kl_k1": round(float(-log_r.mean()), 5), "tokens": int(ref.numel())}
