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


def toy_task_records(n=64, seed=0):
    """Copy tasks ("copy abc:" -> " abc, abc.") as memgen Records."""
    import random

    from memgen.data import Record

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcde") for _ in range(3)) for _ in range(n)]
    return [Record(f"copy {w}:", f" {w}, {w}.", {"answer": f"{w}, {w}."}) for w in words]


def make_base(tok, arch="qwen2", seed=0, **kw):
    kw.setdefault("init_std", 0.2)
    kw.setdefault("hidden_size", 64)
    kw.setdefault("num_layers", 2)
    return tiny_causal_lm(tok, arch=arch, seed=seed, **kw)


# More delimiter characters than the default so random tiny models hit insertion points often.
TEST_DELIMITERS = [",", ".", "\n", " ", "a", "e", "m", "1"]


def make_memgen(
    tok, arch="qwen2", seed=0, k_prompt=3, k_infer=2, randomize=True, delimiters=None, latent_positions="advance", **kw
):
    """A MemGen whose weaver/trigger are randomised so they actually change outputs and decisions."""
    return memgen_on(
        make_base(tok, arch, seed, **kw), tok, seed, k_prompt, k_infer, randomize, delimiters, latent_positions
    )


def memgen_on(
    base,
    tok,
    seed=0,
    k_prompt=3,
    k_infer=2,
    randomize=True,
    delimiters=None,
    latent_positions="advance",
    lora_targets=None,
):
    """make_memgen's MemGen on a given base model (any architecture)."""
    config = MemGenConfig(
        prompt_latents=k_prompt,
        inference_latents=k_infer,
        lora_r=4,
        trigger_hidden=16,
        delimiters=delimiters or TEST_DELIMITERS,
        latent_positions=latent_positions,
        **({"lora_target_modules": lora_targets} if lora_targets else {}),
    )
    model = MemGen(base, tok, config)
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


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory, tok):
    """A tiny model saved as users save theirs: a base directory (with a chat template) and a randomised adapter."""
    root = tmp_path_factory.mktemp("saved-tiny")
    model = make_memgen(tok)
    base, adapter = root / "base", root / "adapter"
    saved_template = getattr(tok, "chat_template", None)
    tok.chat_template = CHAT_TEMPLATE
    try:
        model.reasoner_model.save_pretrained(base)
        tok.save_pretrained(base)
        model.save_pretrained(adapter)
    finally:
        tok.chat_template = saved_template
    return {"root": root, "base": base, "adapter": adapter}


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from its wheel, exported once per test session to a plain directory (fast to load)."""
    from memgen.loading import export_base, packaged_smollm2

    return export_base(packaged_smollm2(), tmp_path_factory.mktemp("smollm2-export") / "base")
