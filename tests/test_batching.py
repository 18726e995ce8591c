"""(c) a left-padded batch of different-length prompts equals row-by-row generation."""

import pytest
import torch
from conftest import ARCHES, PROMPTS, make_memgen


def central_threshold(model) -> float:
    """A threshold in the widest gap (in logit space) among the central observed P(invoke) values.

    The untrained head then both fires and holds back, and no decision sits within float noise
    of the threshold (batched and single-row logits differ by ~1e-6).
    """
    probe = model.generate(PROMPTS, memory="trigger", max_new_tokens=48, trigger_threshold=2.0)
    probs = torch.tensor(
        sorted(i.probability for c in probe.completions for i in c.insertions if i.probability is not None),
        dtype=torch.float64,
    )
    logits = torch.logit(probs.clamp(1e-12, 1 - 1e-12))
    lo, hi = len(logits) // 4, max(len(logits) * 3 // 4, len(logits) // 4 + 1)
    gaps = logits[lo + 1 : hi + 1] - logits[lo:hi]
    i = lo + int(torch.argmax(gaps))
    return float(torch.sigmoid((logits[i] + logits[i + 1]) / 2))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("memory", ["off", "always", "trigger", "trigger+prompt"])
def test_padded_batch_matches_row_by_row(tok, arch, memory):
    model = make_memgen(tok, arch)
    # trigger+prompt: the prompt-end insertion is a trigger decision too (some rows weave there, some not).
    model.config.trigger_at_prompt_end = memory == "trigger+prompt"
    memory = memory.split("+")[0]
    kw = dict(memory=memory, max_new_tokens=48, max_insertions=4, return_logprobs=True, compact_after=8)
    if memory == "trigger":
        kw["trigger_threshold"] = central_threshold(model)
    batch = model.generate(PROMPTS, **kw)
    decisions = 0
    for prompt, completion in zip(PROMPTS, batch.completions):
        single = model.generate([prompt], **kw).completions[0]
        assert completion.token_ids == single.token_ids
        assert completion.finish_reason == single.finish_reason
        assert [(i.position, i.inserted) for i in completion.insertions] == [
            (i.position, i.inserted) for i in single.insertions
        ]
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(single.logprobs), atol=1e-4, rtol=0)
        decisions += len(completion.insertions)
    if memory == "trigger":
        flags = {i.inserted for c in batch.completions for i in c.insertions if i.position > 0}
        assert flags == {True, False}, "the randomised trigger should both fire and hold back"
    if memory != "off":
        assert decisions > len(PROMPTS)


def test_finished_rows_stop_decoding_and_triggering(tok):
    model = make_memgen(tok)
    out = model.generate(
        PROMPTS * 2, memory="always", max_new_tokens=60, do_sample=True, seed=11, top_k=0, max_insertions=100
    )
    finished_early = [c for c in out.completions if c.finish_reason == "eos"]
    assert finished_early, "expected at least one row to hit EOS"
    for c in out.completions:
        assert all(ins.position <= len(c.token_ids) - 1 for ins in c.insertions)
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in c.token_ids[:-1]


def test_cap_on_insertions(tok):
    model = make_memgen(tok)
    out = model.generate(PROMPTS, memory="always", max_new_tokens=60, max_insertions=2)
    for c in out.completions:
        assert sum(1 for i in c.insertions if i.position > 0) <= 2
    no_prompt = model.generate(PROMPTS, memory="always", max_new_tokens=20, insert_at_prompt_end=False)
    assert all(i.position > 0 for c in no_prompt.completions for i in c.insertions)


def test_pad_slot_growth_is_bounded_by_compaction(tok):
    model = make_memgen(tok, k_infer=4)
    kw = dict(memory="random:0.5", max_new_tokens=80, max_insertions=50, do_sample=True, seed=5)
    loose = model.generate(PROMPTS * 2, compact_after=0, **kw)
    tight = model.generate(PROMPTS * 2, compact_after=8, **kw)
    assert [c.token_ids for c in loose.completions] == [c.token_ids for c in tight.completions]
    assert loose.stats["max_pad_slots"] > 16
    assert tight.stats["max_pad_slots"] < 8 + 4 + 1
    assert tight.stats["max_cache_slots"] < loose.stats["max_cache_slots"]
