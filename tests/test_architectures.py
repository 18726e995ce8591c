"""Beyond Qwen2/Llama: sliding-window models (Mistral, Gemma 3, Qwen2 with sliding layers) carry the same
equivalences, and every LM head memgen accepts gives the model's own logits (Granite, Cohere scaling)."""

import pytest
import torch
from conftest import PROMPTS, memgen_on
from test_cached_insertion import recompute_logits
from test_equivalence_off import hf_generate
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma3TextConfig,
    GraniteConfig,
    MistralConfig,
    Qwen2Config,
)

from memgen import MemGen
from memgen.errors import UnsupportedModelError

WINDOW = 16


def common_fields(tok, layers=2):
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )


def sliding_base(tok, kind, attn="sdpa", seed=0):
    if kind == "mistral":
        config = MistralConfig(sliding_window=WINDOW, **common_fields(tok))
    elif kind == "gemma3":  # mixed: sliding and full layers, local and global RoPE, embedding scale
        config = Gemma3TextConfig(
            sliding_window=WINDOW,
            head_dim=16,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **common_fields(tok, layers=3),
        )
    else:  # qwen2 with use_sliding_window: layers from max_window_layers on slide
        config = Qwen2Config(
            use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common_fields(tok, layers=3)
        )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if kind == "gemma3":  # zero-initialised (1 + w) norms make a random tiny Gemma repeat one token whatever
        g = torch.Generator().manual_seed(seed)  # the context; random norm gains make it read the context
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn(param.shape, generator=g))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


SLIDING = ["mistral", "gemma3", "qwen2"]


@pytest.mark.parametrize("kind", SLIDING)
def test_sliding_layout_is_detected(tok, kind):
    model = memgen_on(sliding_base(tok, kind), tok)
    expected = {
        "mistral": ("sliding_attention",),
        "gemma3": ("full_attention", "sliding_attention"),
        "qwen2": ("full_attention", "sliding_attention"),
    }[kind]
    assert model.reasoner.mask_kinds == expected and model.reasoner.sliding_window == WINDOW


@pytest.mark.parametrize("kind", SLIDING)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_memory_off_matches_generate(tok, kind, attn):
    base = sliding_base(tok, kind, attn)
    # HF's own window counts slots, so its padded batches count pad slots; one unpadded row is its definition.
    reference = [hf_generate(base, tok, [p], max_new_tokens=40, do_sample=False)[0] for p in PROMPTS]
    assert max(len(tok(p)["input_ids"]) + len(r) for p, r in zip(PROMPTS, reference)) > 2 * WINDOW
    out = MemGen(base, tok).generate(PROMPTS, memory="off", max_new_tokens=40)
    assert [c.token_ids for c in out.completions] == reference
    # The window really matters here: a full-attention mask gives other tokens.
    assert _without_window(base, tok) != reference


def _without_window(base, tok):
    model = MemGen(base, tok)
    model.reasoner.sliding_window = 10**6
    return [c.token_ids for c in model.generate(PROMPTS, memory="off", max_new_tokens=40).completions]


@pytest.mark.parametrize("kind", SLIDING)
def test_sliding_cached_insertions_match_full_recompute(tok, kind):
    model = memgen_on(sliding_base(tok, kind), tok)
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
            compact_after=4,
        )
        for prompt_ids, completion in zip(model.encode_prompts(PROMPTS), out.completions):
            torch.testing.assert_close(
                completion.logits, recompute_logits(model, prompt_ids, completion), atol=1e-4, rtol=0
            )
    assert sum(c.num_insertions for c in out.completions) >= 2 * len(PROMPTS)
    assert out.stats["compactions"] > 0


@pytest.mark.parametrize("kind", SLIDING)
def test_sliding_teacher_forcing_matches_rollout(tok, kind):
    model = memgen_on(sliding_base(tok, kind), tok).double()
    rollout = model.generate(
        PROMPTS, memory="random:0.5", max_new_tokens=40, do_sample=True, seed=21, max_insertions=4, return_logprobs=True
    )
    tf = model.teacher_forced(
        model.encode_prompts(PROMPTS),
        [c.token_ids for c in rollout.completions],
        [c.insertion_positions for c in rollout.completions],
    )
    assert sum(len(c.insertion_positions) for c in rollout.completions) > len(PROMPTS)
    for r, c in enumerate(rollout.completions):
        torch.testing.assert_close(
            tf.logprobs[r, : len(c.token_ids)], torch.tensor(c.logprobs, dtype=tf.logprobs.dtype), atol=1e-8, rtol=0
        )


@pytest.mark.parametrize("kind", SLIDING)
def test_sliding_padded_batch_matches_rows(tok, kind):
    # float64: this random Mistral's peaked distributions amplify float32 summation-order noise to 5e-4
    # in a log-prob; in float64 batch and rows agree exactly.
    model = memgen_on(sliding_base(tok, kind), tok).double()
    kw = dict(memory="always", max_new_tokens=40, max_insertions=4, return_logprobs=True, compact_after=8)
    batch = model.generate(PROMPTS, **kw)
    for prompt, completion in zip(PROMPTS, batch.completions):
        single = model.generate([prompt], **kw).completions[0]
        assert completion.token_ids == single.token_ids
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(single.logprobs), atol=1e-6, rtol=0)


def test_flash_attention_sliding_models_are_refused(tok):
    base = sliding_base(tok, "mistral")
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        MemGen(base, tok)


# ------------------------------------------------------------------ LM heads
def scaled_head_base(tok, kind):
    if kind == "granite":
        config = GraniteConfig(logits_scaling=8.0, **common_fields(tok))
    else:
        config = CohereConfig(logit_scale=0.125, **common_fields(tok))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_scaled_heads_match_the_models_forward(tok, kind):
    base = scaled_head_base(tok, kind)
    model = MemGen(base, tok)
    out = model.generate(PROMPTS[2], memory="off", max_new_tokens=6, output_logits=True)
    ids = torch.tensor([model.encode_prompts(PROMPTS[2])[0] + out.completions[0].token_ids])
    n = len(out.completions[0].token_ids)
    expected = base(input_ids=ids).logits[0, -n - 1 : -1].float()
    torch.testing.assert_close(out.completions[0].logits, expected, atol=1e-5, rtol=1e-5)
    # Seeded sampling depends on the logits' scale, so it only matches generate with the right head.
    torch.manual_seed(5)
    reference = hf_generate(base, tok, PROMPTS, max_new_tokens=30, do_sample=True, top_k=0)
    sampled = model.generate(PROMPTS, memory="off", max_new_tokens=30, do_sample=True, seed=5)
    assert [c.token_ids for c in sampled.completions] == reference


def test_a_head_memgen_does_not_reproduce_is_refused(tok):
    base = scaled_head_base(tok, "granite")
    original = type(base).forward

    class Odd(type(base)):
        def forward(self, *args, **kwargs):  # a head transform memgen does not know
            out = original(self, *args, **kwargs)
            out.logits = out.logits + 3.0 * out.logits.abs()
            return out

    base.__class__ = Odd
    with pytest.raises(UnsupportedModelError, match="logits differ"):
        MemGen(base, tok)


# ------------------------------------------------------------------ every causal LM transformers ships
SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.2,
)
MOE_SIZES = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    shared_expert_intermediate_size=32,
)


def tiny_model_of_type(model_type, tok):
    """A tiny random model of ``model_type`` from its config class, or None when one cannot be built that way."""
    from transformers import CONFIG_MAPPING

    ids = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    for fields in ({**SIZES, **MOE_SIZES, **ids}, {**SIZES, **ids}):
        try:
            config = CONFIG_MAPPING[model_type](**fields)
            if config.get_text_config(decoder=True).hidden_size != 64:
                return None  # the sizes did not reach the text model (nested configs): not buildable tiny here
            with torch.device("meta"):  # count first: some defaults the sizes above do not reach are huge
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if size > 5_000_000:
                return None
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
        except Exception:
            continue
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        return model
    return None


def causal_lm_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.slow
def test_every_accepted_architecture_gives_the_models_own_logits(tok):
    """Each tiny-buildable causal LM is either refused with a memgen error, or gives the model's own logits and
    ``generate``'s greedy tokens with memory off."""
    import warnings

    from memgen import MemGenError

    accepted, refused, built = [], {}, 0
    for model_type in causal_lm_types():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = tiny_model_of_type(model_type, tok)
        if base is None:
            continue
        built += 1
        try:
            model = memgen_on(base, tok, randomize=False, lora_targets=["all-linear"])
        except MemGenError as exc:
            refused[model_type] = str(exc)
            continue
        prompt = model.encode_prompts(PROMPTS[2])[0]
        out = model.generate(PROMPTS[2], memory="off", max_new_tokens=8, output_logits=True)
        tokens = out.completions[0].token_ids
        with torch.no_grad():
            expected = base(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        torch.testing.assert_close(
            out.completions[0].logits[: len(tokens)],
            expected[: len(tokens)],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m: f"{model_type}: {m}",
        )
        assert tokens == hf_generate(base, tok, [PROMPTS[2]], max_new_tokens=8, do_sample=False)[0], model_type
        accepted.append(model_type)
    print(f"\n{built} tiny-buildable causal LMs: {len(accepted)} accepted {accepted}; {len(refused)} refused")
    for model_type, reason in refused.items():
        print(f"  refused {model_type}: {reason[:160]}")
    assert {"llama", "qwen2", "mistral", "gemma3_text", "granite", "cohere"} <= set(accepted)
