"""An independent check of the weaver's own computation, and of the context-end guard.

The equivalence tests compare two callers of the same ``weave_and_feed``; a bug in shared weaver code
passes them. Here the query pass is rebuilt by hand from plain Hugging Face calls: a forward over the
spliced prefix with the base weights, the K query slots on a *copy* of that cache through a copy of the
model whose LoRA is merged into its weights (so the LoRA acts on the query slots only), explicit
positions, then the projection, anchor map, offsets and norm written out.
"""

import copy

import pytest
import torch
from conftest import PROMPTS, TEST_DELIMITERS, make_base, make_memgen, memgen_on
from transformers import DynamicCache

from memgen.weaver import ADAPTER_NAME


def merged_copy(model):
    """The reasoner with the weaver LoRA merged into its linear weights (W + scaling * B @ A)."""
    names = {id(module): name for name, module in model.reasoner_model.named_modules()}
    merged = copy.deepcopy(model.reasoner_model)
    with torch.no_grad():
        for parent, attr, lora, _ in model.weaver._sites:
            target = merged.get_submodule(f"{names[id(parent)]}.{attr}" if names[id(parent)] else attr)
            delta = lora.lora_B[ADAPTER_NAME].weight @ lora.lora_A[ADAPTER_NAME].weight
            target.weight += lora.scaling[ADAPTER_NAME] * delta.to(target.weight.dtype)
    return merged


@torch.no_grad()
def oracle(model, prompt, completion, insertions):
    """Latents and next-token logits of one row, by hand."""
    plain, merged, weaver = model.reasoner_model, merged_copy(model), model.weaver
    embed = plain.get_input_embeddings()
    vocab = torch.arange(embed.weight.shape[0])
    target_norm = embed(vocab).norm(dim=-1).mean()
    cache, state = DynamicCache(), {"pos": 0}

    def feed(embeds, backbone=plain.get_decoder(), past=None):  # noqa: B008 (bound once, on purpose)
        n = embeds.shape[0]
        out = backbone(
            inputs_embeds=embeds[None],
            cache=cache if past is None else past,
            use_cache=True,
            position_ids=torch.arange(state["pos"], state["pos"] + n)[None],
        )
        return out.last_hidden_state[0]

    def weave(kind, anchor):
        queries = weaver.prompt_queries if kind == "prompt" else weaver.inference_queries
        offsets = weaver.prompt_offsets if kind == "prompt" else weaver.inference_offsets
        hidden = feed(queries, merged.get_decoder(), copy.deepcopy(cache))  # the real cache never sees them
        hidden = hidden + anchor @ weaver.anchor_map.weight.T + weaver.anchor_map.bias
        z = hidden @ weaver.projection.weight.T + weaver.projection.bias + offsets
        return z / z.norm(dim=-1, keepdim=True) * target_norm

    current = feed(embed(torch.tensor(prompt)))[-1]
    state["pos"] = len(prompt)
    latents, logits = [], []
    for i, token in enumerate(completion):
        if i in insertions:
            woven = weave("prompt" if i == 0 else "inference", current)
            latents.append(woven)
            current = feed(woven)[-1]
            state["pos"] += woven.shape[0]
        logits.append(plain.lm_head(current))
        current = feed(embed(torch.tensor([token])))[-1]
        state["pos"] += 1
    return latents, torch.stack(logits)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_weaver_matches_a_hand_built_query_pass(tok, arch):
    # float64: the oracle merges the LoRA into the weights, which rounds differently from peft's separate
    # product in float32 (~1e-5 in latents, amplified in later logits); in float64 any gap is a real mismatch.
    model = make_memgen(tok, arch).double()
    out = model.generate(
        PROMPTS,
        memory="random:0.6",
        max_new_tokens=30,
        do_sample=True,
        seed=8,
        max_insertions=4,
        output_logits=True,
        return_latents=True,
        compact_after=4,
    )
    prompts = model.encode_prompts(PROMPTS)
    tf = model.teacher_forced(
        prompts, [c.token_ids for c in out.completions], [c.insertion_positions for c in out.completions]
    )
    inner = 0
    for r, (prompt, completion) in enumerate(zip(prompts, out.completions)):
        latents, logits = oracle(model, prompt, completion.token_ids, set(completion.insertion_positions))
        woven = [ins.latents for ins in completion.insertions if ins.inserted]
        assert len(woven) == len(latents) >= 1
        for ours, theirs in zip(woven, latents):  # the engine reports latents and logits in float32
            torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(completion.logits, logits.float(), atol=1e-5, rtol=1e-6)
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(tf.logprobs[r, : len(completion.token_ids)].double(), expected, atol=1e-5, rtol=0)
        inner += len(latents) - 1
    assert inner >= len(PROMPTS)  # in-reasoning insertions, not only the prompt end


@pytest.mark.parametrize("k_infer", [1, 3])
def test_no_insertion_runs_past_the_context(tok, k_infer):
    """Every token is a delimiter and the context is small, so the last possible insertion sits right at its
    end: an insertion is offered only if its K latents and the next token still fit."""
    context = 48
    alphabet = sorted(set("".join(PROMPTS)) | set(TEST_DELIMITERS))
    model = memgen_on(
        make_base(tok, max_positions=context),
        tok,
        k_prompt=2,
        k_infer=k_infer,
        delimiters=[ch for ch in tok.get_vocab() if len(ch) == 1] + alphabet,
    )
    assert bool(model.delimiter_lookup[3:].all())
    out = model.generate(PROMPTS, memory="always", max_new_tokens=200, max_insertions=1000, ignore_eos=True)
    for prompt, completion in zip(model.encode_prompts(PROMPTS), out.completions):
        used, pos = len(prompt) + 2, len(prompt) + 2  # prompt plus its 2 prompt latents
        offered = set()
        for i, _token in enumerate(completion.token_ids[:-1]):
            pos += 1  # token i fed
            decision = next((d for d in completion.insertions if d.position == i + 1), None)
            fits = pos + k_infer + 1 <= context - 1
            assert (decision is not None) == fits, (i, pos)
            if decision is not None:
                offered.add(i)
                pos += k_infer
            used = max(used, pos)
        assert used <= context and completion.finish_reason == "length"
        refused = set(range(len(completion.token_ids) - 1)) - offered  # every token is a delimiter
        assert offered and refused and min(refused) == max(offered) + 1  # the guard was exercised at the end
