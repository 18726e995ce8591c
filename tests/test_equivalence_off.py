"""(a) memory 'off' reproduces model.generate token for token, greedy and seeded sampling."""

import pytest
import torch
from conftest import ARCHES, PROMPTS, make_base

from memgen import MemGen


def hf_generate(model, tok, prompts, **kw):
    tok.padding_side = "left"
    enc = tok(prompts, padding=True, return_tensors="pt")
    out = model.generate(**enc, pad_token_id=tok.pad_token_id, **kw)
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        rows.append(row)
    return rows


SAMPLING = [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    dict(do_sample=True, temperature=1.3, top_k=0, top_p=1.0),
]


def hf_kwargs(sampling: dict) -> dict:
    """``sampling`` for HF generate: memgen's top_k=0 default means "off", HF's default is 50."""
    hf_kw = dict(sampling)
    if hf_kw.get("do_sample"):
        hf_kw.setdefault("top_k", 0)
    return hf_kw


def seeded_reference(base, tok, sampling: dict) -> list[list[int]]:
    torch.manual_seed(7)
    return hf_generate(base, tok, PROMPTS, max_new_tokens=40, **hf_kwargs(sampling))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "t0.8-k20-p0.9", "t1.3"])
def test_memory_off_matches_generate(tok, arch, sampling):
    base = make_base(tok, arch)
    reference = seeded_reference(base, tok, sampling)
    model = MemGen(base, tok)
    out = model.generate(PROMPTS, memory="off", max_new_tokens=40, seed=7, **sampling)
    assert [c.token_ids for c in out.completions] == reference
    assert all(c.insertions == [] for c in out.completions)
    # The LoRA-carrying base (adapter switched off) is still the plain model for HF generate.
    assert seeded_reference(base, tok, sampling) == reference


@pytest.mark.parametrize("sampling", SAMPLING[:2], ids=["greedy", "t0.8-k20-p0.9"])
def test_trigger_deciding_the_prompt_end_and_never_firing_matches_generate(tok, sampling):
    """With the prompt end a trigger decision, a trigger that never fires weaves nothing at all: plain generate."""
    from conftest import memgen_on

    base = make_base(tok)
    reference = seeded_reference(base, tok, sampling)
    model = memgen_on(base, tok)
    model.config.trigger_at_prompt_end = True
    out = model.generate(PROMPTS, memory="trigger", trigger_threshold=1.1, max_new_tokens=40, seed=7, **sampling)
    assert [c.token_ids for c in out.completions] == reference
    assert all(c.num_insertions == 0 for c in out.completions)
    # Every row still logged its prompt-end decision, with the trigger's probability.
    assert all(c.insertions[0].position == 0 and 0 < c.insertions[0].probability < 1 for c in out.completions)


def test_reference_outputs_are_nontrivial(tok):
    """Guard: the equivalence above is meaningful only if outputs vary and some rows stop at EOS."""
    base = make_base(tok)
    rows = hf_generate(base, tok, PROMPTS, max_new_tokens=40, do_sample=False)
    assert len({tuple(r) for r in rows}) == len(rows)
    assert any(len(set(r)) > 5 for r in rows)
    torch.manual_seed(7)
    sampled = hf_generate(base, tok, PROMPTS * 3, max_new_tokens=40, do_sample=True, top_k=0)
    assert any(r[-1] == tok.eos_token_id for r in rows + sampled)
