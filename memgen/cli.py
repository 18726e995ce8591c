"""The ``memgen`` command line. Flags come from the same dataclass configs the Python API uses.

    memgen generate --model DIR [--adapter DIR] --prompt TEXT [--memory off|always|trigger|random:P]
                    [--max-new-tokens N] [--seed S] [--json] [--config gen.yaml] [any GenerateConfig flag]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .config import GenerateConfig
from .dataclass_cli import add_dataclass_arguments, config_from_args, load_yaml
from .errors import AdapterError, MemGenError


def load_model(model: str, adapter: str | None):
    """A MemGen from a local model directory (or hub name) and an optional adapter directory."""
    from .loading import load_base
    from .model import MemGen, read_adapter_meta

    if adapter is not None:
        read_adapter_meta(Path(adapter))  # fail fast, before loading the base
    base, tokenizer = load_base(model)
    if adapter is None:
        return MemGen(base, tokenizer), False
    return MemGen.from_pretrained(adapter, base, tokenizer), True


def _generate(args: argparse.Namespace) -> int:
    yaml_values = load_yaml(args.config) if args.config else {}
    config = config_from_args(GenerateConfig, args, yaml_values)
    model, has_adapter = load_model(args.model, args.adapter)
    if not has_adapter and config.policy.kind != "off":
        print("memgen: warning: no --adapter given, so the weaver and trigger are untrained", file=sys.stderr)
    if args.json:
        output = model.generate(args.prompt, config)
    else:
        output = model.generate(args.prompt, config, on_token=lambda e: print(e.text, end="", flush=True))
        print()
    completion = output.completions[0]
    if args.json:
        print(json.dumps({
            "text": completion.text,
            "token_ids": completion.token_ids,
            "finish_reason": completion.finish_reason,
            "insertions": [{"position": i.position, "probability": i.probability, "inserted": i.inserted}
                           for i in completion.insertions],
        }))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memgen", description="Generative latent memory for causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with latent memory")
    gen.add_argument("--model", required=True, help="base model directory (HF save_pretrained) or hub name")
    gen.add_argument("--adapter", default=None, help="memgen adapter directory (MemGen.save_pretrained)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--json", action="store_true", help='print {"text", "token_ids", "insertions"} as JSON')
    gen.add_argument("--config", default=None, help="YAML file of GenerateConfig fields (flags override it)")
    add_dataclass_arguments(gen, GenerateConfig)
    gen.set_defaults(handler=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.handler(args)
    except (MemGenError, AdapterError) as exc:
        print(f"memgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
