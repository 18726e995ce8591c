"""Shared fixtures: tiny real Hugging Face models (Qwen2 and Llama) built from configs, no downloads."""

import pytest
import torch

from memgen import MemGen, MemGenConfig
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

torch.set_num_threads(2)

PROMPTS = ["Hello, world.", "a", "The cat sat on the mat, then"]
ARCHES = ["qwen2", "llama"]


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


def make_base(tok, arch="qwen2", seed=0, **kw):
    kw.setdefault("init_std", 0.2)
    kw.setdefault("hidden_size", 64)
    kw.setdefault("num_layers", 2)
    return tiny_causal_lm(tok, arch=arch, seed=seed, **kw)


# More delimiter characters than the default so random tiny models hit insertion points often.
TEST_DELIMITERS = [",", ".", "\n", " ", "a", "e", "m", "1"]


def make_memgen(tok, arch="qwen2", seed=0, k_prompt=3, k_infer=2, randomize=True, delimiters=None,
                latent_positions="advance", **kw):
    """A MemGen whose weaver/trigger are randomised so they actually change outputs and decisions."""
    config = MemGenConfig(prompt_latents=k_prompt, inference_latents=k_infer, lora_r=4, trigger_hidden=16,
                          delimiters=delimiters or TEST_DELIMITERS, latent_positions=latent_positions)
    model = MemGen(make_base(tok, arch, seed, **kw), tok, config)
    if randomize:
        g = torch.Generator().manual_seed(seed + 123)
        with torch.no_grad():
            for p in model.weaver_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            # The anchor map starts at zero; give it a gain near 0.1 (not 0.3 * sqrt(d)) so float
            # noise in the anchor state stays below the equivalence tests' tolerance.
            anchor_map = model.weaver.anchor_map
            anchor_map.weight.mul_(anchor_map.weight.shape[1] ** -0.5 / 3)
            for p in model.trigger_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1.0)
    return model
