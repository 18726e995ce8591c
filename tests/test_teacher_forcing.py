"""(d) teacher-forced log-probs equal the rollout's; (e) the reasoner is untouched by training."""

import pytest
import torch
from conftest import ARCHES, PROMPTS, make_memgen


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("latent_positions", ["advance", "tied"])
@pytest.mark.parametrize("prompt_decides", [False, True], ids=["prompt-woven", "prompt-decided"])
def test_teacher_forced_logprobs_match_rollout(tok, arch, temperature, latent_positions, prompt_decides):
    # float64: the rollout decodes one token per forward and teacher forcing whole chunks, so in
    # float32 their sums differ by ~1e-5 (up to 2e-4 on unlikely tokens); in float64 the two
    # agree to the rounding of the float32 log-probs both report, so any gap is a real mismatch.
    model = make_memgen(tok, arch, latent_positions=latent_positions).double()
    model.config.trigger_at_prompt_end = prompt_decides
    rollout = model.generate(
        PROMPTS,
        memory="random:0.5",
        max_new_tokens=40,
        do_sample=True,
        seed=21,
        temperature=temperature,
        max_insertions=4,
        return_logprobs=True,
    )
    prompts = model.encode_prompts(PROMPTS)
    completions = [c.token_ids for c in rollout.completions]
    positions = [c.insertion_positions for c in rollout.completions]
    assert sum(len(p) for p in positions) > len(PROMPTS), "trajectory should contain in-reasoning insertions"
    tf = model.teacher_forced(prompts, completions, positions, temperature=temperature)
    for r, c in enumerate(rollout.completions):
        n = len(c.token_ids)
        assert tf.mask[r].sum() == n
        torch.testing.assert_close(
            tf.logprobs[r, :n], torch.tensor(c.logprobs, dtype=tf.logprobs.dtype), atol=1e-8, rtol=0
        )
        assert torch.all(tf.logprobs[r, n:] == 0)
        # The trigger logits read at decision tokens equal the rollout's logged probabilities.
        for ins in c.insertions:
            if ins.probability is not None:
                z = tf.prompt_trigger_logits[r] if ins.position == 0 else tf.trigger_logits[r, ins.position - 1]
                assert abs(torch.sigmoid(z).item() - ins.probability) < 1e-8
    prompt_end = [c.insertions[0] for c in rollout.completions]
    assert all(ins.position == 0 for ins in prompt_end)
    if prompt_decides:  # a decision per row, and both outcomes occur, so the skipped prompt end is covered
        assert all(ins.probability is not None for ins in prompt_end)
        assert {ins.inserted for ins in prompt_end} == {True, False}
    else:
        assert all(ins.probability is None and ins.inserted for ins in prompt_end)


def test_teacher_forced_cost_is_linear(tok):
    """One row: every fed token once, plus 2K slots per insertion (no prefix re-runs)."""
    model = make_memgen(tok, k_prompt=3, k_infer=2)
    prompt = model.encode_prompts(PROMPTS[2])[0]
    completion = list(range(10, 40))
    tf = model.teacher_forced([prompt], [completion], [[0, 5, 11, 20]])
    fed = len(prompt) + len(completion) - 1
    assert tf.token_forwards == fed + 2 * 3 + 3 * 2 * 2


def test_memory_off_teacher_forcing_matches_plain_model(tok):
    model = make_memgen(tok)
    prompt = model.encode_prompts(PROMPTS[0])[0]
    completion = list(range(10, 30))
    tf = model.teacher_forced([prompt], [completion], [[]])
    ids = torch.tensor([prompt + completion])
    logits = model.reasoner_model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    torch.testing.assert_close(tf.logprobs[0], expected, atol=1e-5, rtol=0)


def test_gradients_reach_weaver_and_trigger_only(tok):
    model = make_memgen(tok)
    model.train()
    before = {n: p.detach().clone() for n, p in model.reasoner_model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in model.reasoner_parameters())
    prompts = model.encode_prompts(PROMPTS)
    completions = [list(range(5, 25)), list(range(30, 42)), list(range(50, 80))]
    insertions = [[0, 4, 9], [3], [0, 1, 2, 20]]
    params = model.weaver_parameters() + model.trigger_parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    tf = model.teacher_forced(prompts, completions, insertions)
    loss = -(tf.logprobs * tf.mask).sum() / tf.mask.sum() + tf.trigger_logits.sigmoid().mean()
    loss.backward()
    groups = {
        "prompt_queries": model.weaver.prompt_queries,
        "inference_queries": model.weaver.inference_queries,
        "projection": model.weaver.projection.weight,
        "anchor_map": model.weaver.anchor_map.weight,
    }
    for name, p in groups.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    lora_grads = [p.grad for p in model.weaver.adapter_parameters()]
    assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0
    assert all(p.grad is not None for p in model.trigger_parameters())
    optimizer.step()
    for n, p in model.reasoner_model.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n


def test_bad_insertion_positions_are_refused(tok):
    from memgen import InputError

    model = make_memgen(tok)
    with pytest.raises(InputError, match="strictly increasing"):
        model.teacher_forced([[5, 6]], [[7, 8, 9]], [[2, 1]])
    with pytest.raises(InputError, match="lie in"):
        model.teacher_forced([[5, 6]], [[7, 8, 9]], [[3]])
    with pytest.raises(InputError, match="empty completion"):
        model.teacher_forced([[5, 6]], [[]], [[]])
