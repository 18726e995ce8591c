"""Loading base models and tokenizers from local directories (or hub names, for users who have them).

transformers 5's ``AutoTokenizer`` swaps in the model type's own tokenizer class (e.g.
``Qwen2Tokenizer`` with its byte-level pre-tokenizer) when ``tokenizer_config.json`` names the
generic ``TokenizersBackend``, which silently re-tokenizes custom vocabularies such as the
character-level ones memgen trains from scratch. When the saved config names the generic
backend we load ``tokenizer.json`` exactly as saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MemGenError

GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = str(path)
    config_file = Path(path) / "tokenizer_config.json"
    loader = AutoTokenizer
    if config_file.is_file() and (Path(path) / "tokenizer.json").is_file():
        if json.loads(config_file.read_text()).get("tokenizer_class", "") in GENERIC_TOKENIZER_CLASSES:
            loader = PreTrainedTokenizerFast
    tokenizer = loader.from_pretrained(path)
    tokenizer.padding_side = "left"
    return tokenizer


def load_base(model: str | Path, **model_kwargs):
    """(model, tokenizer) from a local directory saved with ``save_pretrained`` or a hub name."""
    from transformers import AutoModelForCausalLM

    model = os.path.expanduser(str(model))
    looks_local = model.startswith((".", "/")) or os.path.exists(model)
    if looks_local and not Path(model).is_dir():
        raise MemGenError(f"model directory {model} does not exist")
    try:
        tokenizer = load_tokenizer(model)
        base = AutoModelForCausalLM.from_pretrained(model, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise MemGenError(f"could not load model {model!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer
