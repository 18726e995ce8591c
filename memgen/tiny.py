"""Tiny tokenizers and causal LMs built from configs, for tests, benchmarks and the offline demo.

Nothing here downloads anything: the tokenizer is a character-level BPE (plus a few merged
tokens such as ``".\n"`` so delimiter handling meets the merged tokens real BPE vocabularies
have) and the models are randomly initialised Qwen2 or Llama networks.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"
DEFAULT_MERGES = ((".", "\n"), (",", " "), ("=", " "), (" ", "="))


def tiny_tokenizer(alphabet: str = DEFAULT_ALPHABET, merges=DEFAULT_MERGES) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a handful of merged tokens; ids 0-2 are pad, eos, bos."""
    vocab = {PAD: 0, EOS: 1, BOS: 2}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    merges = [(left, right) for left, right in merges if left in vocab and right in vocab]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=BOS)
    tokenizer.padding_side = "left"
    return tokenizer


_ARCHES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def tiny_causal_lm(
    tokenizer,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    tie_embeddings: bool = True,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised decoder-only LM sized for CPU tests (hidden 32-512).

    A larger ``init_std`` (e.g. 0.2) gives an untrained model varied, non-repeating greedy
    output, which equivalence tests need to exercise delimiters and EOS.
    """
    if arch not in _ARCHES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(_ARCHES)}")
    config_cls, model_cls = _ARCHES[arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
