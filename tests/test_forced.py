"""Forced decoding scores a given continuation under the memory policy; three equivalences pin it down."""

import pytest
import torch
from conftest import PROMPTS, make_memgen
from test_batching import central_threshold

from memgen import GenerateConfig
from memgen.forced import score_continuations

CONTINUATIONS = [" hello back, world.", " a b, c.", " and then it slept, soundly."]


def encoded(model):
    return model.encode_prompts(PROMPTS), [model.tokenizer(c)["input_ids"] for c in CONTINUATIONS]


# memgen reads float32 logits from the reasoner in every dtype (as the reference does here), so float64 agrees
# to float32 rounding of the logits and float32 to its summation-order noise.
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_memory_off_equals_the_plain_causal_lm(tok, dtype, atol):
    model = make_memgen(tok).to(dtype)
    prompts, conts = encoded(model)
    scores = score_continuations(model, prompts, conts, GenerateConfig(memory="off"))
    for prompt, cont, score in zip(prompts, conts, scores):
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = model.reasoner_model(input_ids=ids).logits.float().log_softmax(-1)[0]
        start = len(prompt) - 1
        want = logp[start : start + len(cont)].gather(1, torch.tensor(cont)[:, None]).squeeze(1)
        torch.testing.assert_close(
            torch.tensor(score.token_logprobs, dtype=torch.float64), want.double(), atol=atol, rtol=0
        )
        assert score.greedy == (logp[start : start + len(cont)].argmax(-1) == torch.tensor(cont)).tolist()
        assert score.insertions == []


def test_memory_always_equals_teacher_forcing_at_its_insertion_points(tok):
    model = make_memgen(tok).double()
    prompts, conts = encoded(model)
    scores = score_continuations(model, prompts, conts, GenerateConfig(memory="always", max_insertions=3))
    positions = [[i.position for i in s.insertions if i.inserted] for s in scores]
    assert all(p and p[0] == 0 for p in positions)
    assert any(len([q for q in p if q > 0]) == 3 for p in positions)  # the cap holds while reading
    with torch.no_grad():
        tf = model.teacher_forced(prompts, conts, positions)
    for r, score in enumerate(scores):
        want = tf.logprobs[r, : len(conts[r])].double()
        torch.testing.assert_close(torch.tensor(score.token_logprobs, dtype=torch.float64), want, atol=1e-6, rtol=0)


def test_trigger_insertions_equal_a_greedy_rollout_that_made_the_same_tokens(tok):
    model = make_memgen(tok).double()
    model.config.trigger_at_prompt_end = True
    model.prompt_trigger = model._new_trigger_head().double()
    threshold = central_threshold(model)
    cfg = GenerateConfig(memory="trigger", trigger_threshold=threshold, max_new_tokens=40, max_insertions=4)
    rollout = model.generate(PROMPTS, cfg, return_logprobs=True).completions
    scores = score_continuations(model, PROMPTS, [c.token_ids for c in rollout], cfg)
    flags = set()
    for completion, score in zip(rollout, scores):
        got = [(i.position, i.inserted, round(i.probability, 9)) for i in score.insertions]
        want = [(i.position, i.inserted, round(i.probability, 9)) for i in completion.insertions]
        assert got == want
        torch.testing.assert_close(
            torch.tensor(score.token_logprobs), torch.tensor(completion.logprobs), atol=1e-9, rtol=0
        )
        assert score.is_greedy  # the rollout chose them greedily
        flags |= {i.inserted for i in score.insertions}
    assert flags == {True, False}


def test_forced_tokens_past_eos_are_scored_and_bad_input_is_refused(tok):
    model = make_memgen(tok)
    eos = tok.eos_token_id
    (score,) = score_continuations(model, ["a"], [[eos, 5, 6]], GenerateConfig(memory="off"))
    assert len(score.token_logprobs) == 3
    with pytest.raises(Exception, match="continuation"):
        score_continuations(model, ["a", "b"], [[5]], GenerateConfig(memory="off"))
    with pytest.raises(Exception, match="continuation"):
        score_continuations(model, ["a"], [[]], GenerateConfig(memory="off"))
