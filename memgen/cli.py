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


def _train(args: argparse.Namespace) -> int:
    from .train import TriggerTrainConfig, WeaverTrainConfig, train_trigger, train_weaver

    cls = WeaverTrainConfig if args.target == "weaver" else TriggerTrainConfig
    config = config_from_args(cls, args, load_yaml(args.config) if args.config else {})
    final = train_weaver(config) if args.target == "weaver" else train_trigger(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"final adapter: {final}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate, format_table
    from .tasks import load_task

    config = config_from_args(EvalConfig, args, load_yaml(args.config) if args.config else {})
    if not config.data:
        raise MemGenError("--data is required")
    task = load_task(config.task, config.data, config.skip_malformed, config.seed, config.limit)
    model, has_adapter = load_model(args.model, args.adapter)
    if not has_adapter and config.policy_needs_adapter():
        print("memgen: warning: no --adapter given, so the weaver and trigger are untrained", file=sys.stderr)
    summary = evaluate(model, task, config)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table([summary], list(summary)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args, load_yaml(args.config) if args.config else {}))
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

    from .evaluate import EvalConfig
    from .train.config import TriggerTrainConfig, WeaverTrainConfig

    train = sub.add_parser("train", help="train the weaver (sft | grpo) or the trigger (RL)")
    targets = train.add_subparsers(dest="target", required=True)
    for name, cls, text in (("weaver", WeaverTrainConfig, "weaver SFT or GRPO (reasoner frozen)"),
                            ("trigger", TriggerTrainConfig, "trigger RL with the sparsity penalty (weaver frozen)")):
        target = targets.add_parser(name, help=text)
        target.add_argument("--config", default=None, help="YAML file of config fields (flags override it)")
        add_dataclass_arguments(target, cls)
        target.set_defaults(handler=_train)

    ev = sub.add_parser("eval", help="evaluate on a benchmark task")
    ev.add_argument("--model", required=True, help="base model directory (HF save_pretrained) or hub name")
    ev.add_argument("--adapter", default=None, help="memgen adapter directory")
    ev.add_argument("--json", action="store_true", help="print the summary as JSON")
    ev.add_argument("--config", default=None, help="YAML file of EvalConfig fields (flags override it)")
    add_dataclass_arguments(ev, EvalConfig)
    ev.set_defaults(handler=_eval)

    from .demo.pipeline import DemoConfig

    demo = sub.add_parser("demo", help="the offline end-to-end MemGen experiment (tiny reasoner, all arms)")
    demo.add_argument("--config", default=None, help="YAML file of DemoConfig fields (flags override it)")
    add_dataclass_arguments(demo, DemoConfig)
    demo.set_defaults(handler=_demo)
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
