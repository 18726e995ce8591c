"""memgen's own calls into transformers raise no deprecation warning.

transformers deprecates an argument for a few minor releases before removing it (5.25 warned
that ``past_key_values`` goes in 5.40); memgen allows any 5.x from 5.24, so a warning today is
a crash after an ordinary upgrade. This runs the engine (prefill, decode, insertions),
teacher forcing and a training step's backward on both tiny architectures and fails on any
deprecation warning they raise.
"""

import warnings

import pytest
from conftest import ARCHES, PROMPTS, make_memgen


@pytest.mark.parametrize("arch", ARCHES)
def test_memgen_calls_raise_no_deprecation_warning(tok, arch):
    model = make_memgen(tok, arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(
            PROMPTS, memory="random:0.5", max_new_tokens=12, do_sample=True, seed=0, return_logprobs=True
        )
        tf = model.teacher_forced(
            model.encode_prompts(PROMPTS),
            [c.token_ids for c in out.completions],
            [c.insertion_positions for c in out.completions],
        )
        (-(tf.logprobs * tf.mask).sum()).backward()
    deprecations = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message).lower()
    ]
    assert deprecations == []
    assert sum(c.num_insertions for c in out.completions) > 0
