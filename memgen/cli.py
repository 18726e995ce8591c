"""The ``memgen`` command line. Flags come from the same dataclass configs the Python API uses.

memgen generate --model DIR [--adapter DIR] --prompt TEXT [--memory off|always|trigger|random:P]
                [--max-new-tokens N] [--seed S] [--json] [--config gen.yaml] [any GenerateConfig flag]
memgen serve --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000] [any ServeConfig flag]
memgen lm-eval --model memgen --model_args pretrained=M,memory=always --tasks gsm8k_local [any lm_eval flag]
memgen experience build|show|search|insights|workflows --store DIR [--source FILE] [--embedder reasoner|bm25|st:DIR] ...
memgen analyze --model DIR --adapter DIR --task TASK --data FILE --out DIR [--clusters 4] [any AnalyzeConfig flag]
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


def load_model(model: str, adapter: str | None, gguf_file: str | None = None, base_dtype: str = "float32"):
    """A MemGen from a base model (directory, hub name or GGUF file) and an optional adapter directory."""
    from .loading import load_base, resolve_source
    from .model import MemGen, read_adapter_meta
    from .precision import resolve_base_dtype

    resolve_source(model, gguf_file)  # fail fast on a mistaken path, before anything loads
    if adapter is not None:
        read_adapter_meta(Path(adapter))
    dtype, _ = resolve_base_dtype(base_dtype, "cpu")  # where load_base puts the model
    base, tokenizer = load_base(model, gguf_file, dtype=dtype)
    if adapter is None:
        return MemGen(base, tokenizer), False
    return MemGen.from_pretrained(adapter, base, tokenizer), True


def _config(cls: type, args: argparse.Namespace):
    """``cls`` from defaults, then the --config YAML, then the flags given."""
    return config_from_args(cls, args, load_yaml(args.config) if args.config else {})


def _generate(args: argparse.Namespace) -> int:
    config = _config(GenerateConfig, args)
    model, has_adapter = load_model(args.model, args.adapter, args.gguf_file, args.base_dtype)
    if not has_adapter and config.policy.kind != "off":
        print("memgen: warning: no --adapter given, so the weaver and trigger are untrained", file=sys.stderr)
    prompt = args.prompt
    if args.use_chat_template:
        from .data import Record, prompt_token_ids

        prompt = [prompt_token_ids(Record(args.prompt, None, {}), model.tokenizer, True)]
    if args.json:
        output = model.generate(prompt, config)
    else:
        output = model.generate(prompt, config, on_token=lambda e: print(e.text, end="", flush=True))
        print()
    completion = output.completions[0]
    if args.json:
        print(
            json.dumps(
                {
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                    "insertions": [
                        {"position": i.position, "probability": i.probability, "inserted": i.inserted}
                        for i in completion.insertions
                    ],
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serving.config import ServeConfig

    config = _config(ServeConfig, args)
    try:
        from .serving.server import default_model_name, serve
    except ImportError as exc:
        raise MemGenError(f"memgen serve needs FastAPI and uvicorn: pip install 'memgen[serve]' ({exc})") from None
    model, has_adapter = load_model(args.model, args.adapter, args.gguf_file, args.base_dtype)
    if not has_adapter and config.memory != "off":
        print("memgen: warning: no --adapter given, so the weaver and trigger are untrained", file=sys.stderr)
    experience = None
    if config.experience:
        from .experience.weaving import open_reader

        experience = open_reader(config, model)  # read-only: requests never write to the store
    name = config.served_model_name or default_model_name(args.model)
    print(f"memgen: serving {name!r} on http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)
    serve(model, config, name, has_adapter, experience)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TriggerTrainConfig, WeaverTrainConfig, train_trigger, train_weaver

    cls = WeaverTrainConfig if args.target == "weaver" else TriggerTrainConfig
    config = _config(cls, args)
    final = train_weaver(config) if args.target == "weaver" else train_trigger(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"final adapter: {final}")
    return 0


def _eval_task(config):
    """The task an EvalConfig names: an agent task (episodes) or a single-turn one; evaluation applies --limit."""
    from .tasks import load_named_task

    if not config.data and config.task != "ledger":
        raise MemGenError("--data is required")
    task = load_named_task(config, env_split=config.split or "valid_seen")
    if task.episodic and config.memory_source != "weaver":  # before any model is loaded
        raise MemGenError("agent tasks evaluate with --memory-source weaver")
    return task


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate_task, format_table

    config = _config(EvalConfig, args)
    task = _eval_task(config)
    model, has_adapter = load_model(args.model, args.adapter, args.gguf_file, args.base_dtype)
    if not has_adapter and config.policy_needs_adapter():
        print("memgen: warning: no --adapter given, so the weaver and trigger are untrained", file=sys.stderr)
    summary = evaluate_task(model, task, config)
    if args.json:
        print(json.dumps(summary))
    else:
        # Failure types as columns of their own (a `wrong_answer` column), not a dict in one cell.
        flat = {k: v for k, v in summary.items() if k != "failures"}
        flat.update({kind: n for kind, n in summary.get("failures", {}).items() if kind != "correct"})
        print(format_table([flat], list(flat)))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import AnalyzeConfig, analyze

    config = _config(AnalyzeConfig, args)
    task = _eval_task(config)
    model, has_adapter = load_model(args.model, args.adapter, args.gguf_file, args.base_dtype)
    if not has_adapter:
        print("memgen: warning: no --adapter given, so the latents come from an untrained weaver", file=sys.stderr)
    report = analyze(model, task, config, describe={"model": args.model, "adapter": args.adapter or ""})
    if args.json:
        print(
            json.dumps(
                {
                    k: report[k]
                    for k in (
                        "task",
                        "examples",
                        "insertions",
                        "clusters",
                        "sizes",
                        "silhouette",
                        "baseline",
                        "ablations",
                    )
                }
            )
        )
    return 0


def _agent(args: argparse.Namespace) -> int:
    from .agents.play import ExpertConfig, PlayConfig, format_replay, play, replay_split

    if args.action == "expert":
        summary = replay_split(_config(ExpertConfig, args))
        print(format_replay(summary))
        return 0 if not summary["failed"] else 1
    model, _ = load_model(args.model, args.adapter, args.gguf_file, args.base_dtype)
    play(model, _config(PlayConfig, args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import DemoConfig, run_demo

    run_demo(_config(DemoConfig, args))
    return 0


def _real_demo(args: argparse.Namespace) -> int:
    from .demo.real_model import RealDemoConfig, run_real_demo

    run_real_demo(_config(RealDemoConfig, args))
    return 0


def _experience(args: argparse.Namespace) -> int:
    from .experience.config import ExperienceConfig, run_experience

    print(run_experience(args.action, _config(ExperienceConfig, args)))
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from .evaluate import format_table
    from .tasks.references import ReferenceCheckConfig, check_references, sandbox_info

    if args.action == "info":
        print(json.dumps(sandbox_info(), indent=1))
        return 0
    report = check_references(_config(ReferenceCheckConfig, args))
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(format_table([report["summary"]], list(report["summary"])))
        for row in report["failures"]:
            print(f"{row['item']}: {row['status']}: {row['error'] or row['detail']}")
    return 0 if not report["failures"] else 1


def _export_base(args: argparse.Namespace) -> int:
    from .loading import export_base

    print(f"wrote {export_base(args.model, args.out, args.gguf_file, args.dtype)}")
    return 0


def _command(parent, name: str, text: str, cls: type, handler, model: bool = False, json_flag: str | None = None):
    """A subcommand whose flags are the fields of ``cls`` (plus --config YAML, and --model/--adapter)."""
    command = parent.add_parser(name, help=text)
    if model:
        command.add_argument(
            "--model", required=True, help="base model: a save_pretrained directory, a hub name, or a .gguf file"
        )
        command.add_argument("--gguf-file", default=None, help="a GGUF file inside the --model directory")
        command.add_argument(
            "--base-dtype",
            default="float32",
            choices=["float32", "bfloat16", "auto"],
            help="dtype the base runs in (auto: bfloat16 where bf16 is native)",
        )
        command.add_argument("--adapter", default=None, help="memgen adapter directory (MemGen.save_pretrained)")
    if json_flag:
        command.add_argument("--json", action="store_true", help=json_flag)
    command.add_argument("--config", default=None, help=f"YAML file of {cls.__name__} fields (flags override it)")
    add_dataclass_arguments(command, cls)
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    from .demo.pipeline import DemoConfig
    from .demo.real_model import RealDemoConfig
    from .evaluate import EvalConfig
    from .train.config import TriggerTrainConfig, WeaverTrainConfig

    parser = argparse.ArgumentParser(prog="memgen", description="Generative latent memory for causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = _command(
        sub,
        "generate",
        "generate text with latent memory",
        GenerateConfig,
        _generate,
        model=True,
        json_flag='print {"text", "token_ids", "insertions"} as JSON',
    )
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument(
        "--use-chat-template",
        action="store_true",
        help="send the prompt as a user message through the tokenizer's chat template",
    )
    sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with --model memgen and local task overrides (every lm_eval flag works)",
    )
    from .serving.config import ServeConfig

    _command(
        sub,
        "serve",
        "serve the model over the OpenAI API (chat and completions) with continuous batching",
        ServeConfig,
        _serve,
        model=True,
    )
    train = sub.add_parser("train", help="train the weaver (sft | grpo) or the trigger (RL)")
    targets = train.add_subparsers(dest="target", required=True)
    _command(targets, "weaver", "weaver SFT or GRPO (reasoner frozen)", WeaverTrainConfig, _train)
    _command(targets, "trigger", "trigger RL with the sparsity penalty (weaver frozen)", TriggerTrainConfig, _train)
    _command(
        sub,
        "eval",
        "evaluate on a benchmark task",
        EvalConfig,
        _eval,
        model=True,
        json_flag="print the summary as JSON",
    )
    from .analysis import AnalyzeConfig

    _command(
        sub,
        "analyze",
        "memory faculties: collect, cluster, read and ablate the woven latents (paper App. G)",
        AnalyzeConfig,
        _analyze,
        model=True,
        json_flag="print the clusters, silhouette and ablations as JSON",
    )
    from .experience.config import ExperienceConfig

    experience = sub.add_parser("experience", help="build, show, search or derive from an experience store")
    actions = experience.add_subparsers(dest="action", required=True)
    for action, text in (
        ("build", "add trajectories from a JSONL file (records or `memgen eval --output`)"),
        ("show", "count and list the records"),
        ("search", "the records nearest to --query"),
        ("insights", "ExpeL: extract insights from the --task trajectories with --model"),
        ("workflows", "AWM: induce workflows from the --task successes with --model"),
    ):
        _command(actions, action, text, ExperienceConfig, _experience)
    from .agents.play import ExpertConfig, PlayConfig

    agent = sub.add_parser("agent", help="multi-turn agents: watch an episode, or replay the ALFWorld expert")
    agent_actions = agent.add_subparsers(dest="action", required=True)
    _command(agent_actions, "play", "play one episode and show it turn by turn", PlayConfig, _agent, model=True)
    _command(
        agent_actions,
        "expert",
        "replay the ALFWorld expert on a split (exit 1 if any game fails)",
        ExpertConfig,
        _agent,
    )
    from .tasks.references import ReferenceCheckConfig

    sandbox = sub.add_parser("sandbox", help="the code-execution sandbox: what it enforces here, reference checks")
    sandbox_actions = sandbox.add_subparsers(dest="action", required=True)
    info = sandbox_actions.add_parser("info", help="print the isolation mechanisms in force on this machine")
    info.set_defaults(handler=_sandbox)
    _command(
        sandbox_actions,
        "check",
        "run a code task's reference solutions in the sandbox (exit 1 if any fails)",
        ReferenceCheckConfig,
        _sandbox,
        json_flag="print the summary, failures and skips as JSON",
    )
    export = sub.add_parser(
        "export-base",
        help="write a base model (e.g. a GGUF file) once as a plain "
        "save_pretrained directory, so later runs skip the dequantization",
    )
    export.add_argument("--model", required=True, help="a .gguf file, a save_pretrained directory or a hub name")
    export.add_argument("--gguf-file", default=None, help="a GGUF file inside the --model directory")
    export.add_argument("--out", required=True, help="the directory to write")
    export.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (GGUF dequantizes to float32)",
    )
    export.set_defaults(handler=_export_base)
    _command(sub, "demo", "the offline end-to-end MemGen experiment (tiny reasoner, all arms)", DemoConfig, _demo)
    _command(
        sub,
        "real-demo",
        "the demo's experiment on a real pretrained model (SmolLM2-135M-Instruct by "
        "default): every arm, 3 seeds, cached and resumable",
        RealDemoConfig,
        _real_demo,
    )
    return parser


_PACKAGE_DIR = Path(__file__).resolve().parent


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """memgen's own warnings (skipped data lines, emulated bf16) as ``memgen: warning: ...`` lines."""
    if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):  # not "memgen" in the path: checkouts are named so
        print(f"memgen: warning: {message}", file=sys.stderr)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own flags, passed through untouched
        from .harness.cli import run

        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    try:
        return args.handler(args)
    except (MemGenError, AdapterError) as exc:
        print(f"memgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
