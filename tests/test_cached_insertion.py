"""(b) logits after cached insertions equal a full no-cache recompute of the spliced sequence."""

import pytest
import torch
from conftest import ARCHES, PROMPTS, make_memgen


def recompute_logits(model, prompt_ids, completion):
    """One uncached forward over [prompt, latents, tokens, latents, ...]; logits predicting each completion token."""
    reasoner = model.reasoner
    embed = reasoner.embed
    tied = model.config.latent_positions == "tied"
    pieces, predictors = [embed(torch.tensor(prompt_ids))], []
    positions = list(range(len(prompt_ids)))
    inserted = {ins.position: ins.latents for ins in completion.insertions if ins.inserted}
    for i, token in enumerate(completion.token_ids):
        if i in inserted:
            k, last = inserted[i].shape[0], positions[-1]
            pieces.append(inserted[i].to(reasoner.dtype))
            positions += [last] * k if tied else list(range(last + 1, last + 1 + k))
        predictors.append(len(positions) - 1)
        pieces.append(embed(torch.tensor([token])))
        next_text = positions[-1] + 1 if not tied else max(p for p in positions) + 1
        positions.append(next_text)
    embeds = torch.cat(pieces)[None]
    # An explicit all-ones mask: without one, transformers reads repeated position ids as packed sequences.
    hidden = reasoner.backbone(
        inputs_embeds=embeds,
        position_ids=torch.tensor([positions]),
        attention_mask=torch.ones(1, len(positions), dtype=torch.long),
        use_cache=False,
    ).last_hidden_state[0]
    return reasoner.logits(hidden[predictors])


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("compact_after", [0, 1], ids=["no-compaction", "compact-every-step"])
@pytest.mark.parametrize("latent_positions", ["advance", "tied"])
def test_cached_insertions_match_full_recompute(tok, arch, compact_after, latent_positions):
    model = make_memgen(tok, arch, latent_positions=latent_positions)
    with torch.no_grad():
        out = model.generate(
            PROMPTS,
            memory="random:0.6",
            max_new_tokens=40,
            do_sample=True,
            seed=3,
            max_insertions=5,
            output_logits=True,
            return_latents=True,
            compact_after=compact_after,
        )
        prompts = model.encode_prompts(PROMPTS)
        total_inserted = 0
        for prompt_ids, completion in zip(prompts, out.completions):
            total_inserted += completion.num_insertions
            expected = recompute_logits(model, prompt_ids, completion)
            assert completion.logits.shape == expected.shape
            torch.testing.assert_close(completion.logits, expected, atol=1e-4, rtol=0)
    # Rows inserted at different steps, so masked pad slots (and compaction) were exercised.
    assert total_inserted >= 2 * len(PROMPTS)
    assert len({tuple(c.insertion_positions) for c in out.completions}) == len(PROMPTS)
    if compact_after:
        assert out.stats["compactions"] > 0


def test_latents_change_the_continuation(tok):
    """Guard against a no-op weaver: with memory the logits differ from memory-off logits."""
    model = make_memgen(tok)
    on = model.generate(PROMPTS[:1], memory="always", max_new_tokens=5, output_logits=True)
    off = model.generate(PROMPTS[:1], memory="off", max_new_tokens=5, output_logits=True)
    assert (on.completions[0].logits[0] - off.completions[0].logits[0]).abs().max() > 1e-2


def test_latents_have_token_embedding_norm(tok):
    model = make_memgen(tok)
    out = model.generate(PROMPTS[:1], memory="always", max_new_tokens=20, return_latents=True)
    target = model.reasoner.embedding_norm()
    for ins in out.completions[0].insertions:
        if ins.inserted:
            torch.testing.assert_close(
                ins.latents.norm(dim=-1), torch.full((ins.latents.shape[0],), target), atol=1e-4, rtol=1e-4
            )
