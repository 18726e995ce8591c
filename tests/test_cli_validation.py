"""Out-of-range numbers never give a traceback: every numeric flag of every subcommand is fuzzed."""

import dataclasses
import typing

import pytest

from memgen.cli import main
from memgen.config import GenerateConfig, MemGenConfig
from memgen.dataclass_cli import check_ranges
from memgen.demo.pipeline import DemoConfig
from memgen.errors import ConfigError
from memgen.evaluate import EvalConfig
from memgen.train.config import TriggerTrainConfig, WeaverTrainConfig

SUBCOMMANDS = {
    "generate": (["generate", "--model", "m", "--prompt", "hi"], GenerateConfig),
    "train weaver": (["train", "weaver", "--model", "m", "--data", "d"], WeaverTrainConfig),
    "train trigger": (["train", "trigger", "--model", "m", "--data", "d", "--adapter", "a"], TriggerTrainConfig),
    "eval": (["eval", "--model", "m", "--data", "d"], EvalConfig),
    "demo": (["demo"], DemoConfig),
}


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is list:
            continue
        kinds = {t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)}
        if kinds & {int, float} and bool not in kinds:
            yield f, (float if float in kinds else int)


def out_of_range(bounds, kind):
    """One value outside ``bounds`` for each side the field has."""
    values = []
    if "ge" in bounds:
        values.append(bounds["ge"] - (1 if kind is int else 0.5))
    if "gt" in bounds:
        values.append(bounds["gt"])
    if "le" in bounds:
        values.append(bounds["le"] + 1)
    if "lt" in bounds:
        values.append(bounds["lt"])
    return [kind(v) for v in values]


CASES = [
    (name, f.name, value)
    for name, (_, cls) in SUBCOMMANDS.items()
    for f, kind in numeric_fields(cls)
    for value in out_of_range(f.metadata.get("range", {}), kind)
]


@pytest.mark.parametrize(
    "config_cls", [MemGenConfig, GenerateConfig, WeaverTrainConfig, TriggerTrainConfig, EvalConfig, DemoConfig]
)
def test_every_numeric_field_declares_its_range(config_cls):
    missing = [f.name for f, _ in numeric_fields(config_cls) if "range" not in f.metadata]
    assert not missing, f"{config_cls.__name__} fields without an allowed range: {missing}"


def test_the_fuzz_covers_every_subcommand():
    assert {name for name, _, _ in CASES} == set(SUBCOMMANDS) and len(CASES) > 60


@pytest.mark.parametrize("command, field, value", CASES)
def test_out_of_range_flag_exits_2_with_one_line(capsys, command, field, value):
    argv, _ = SUBCOMMANDS[command]
    code = main(argv + ["--" + field.replace("_", "-"), str(value)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memgen: error: ") and field in lines[0], err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "m", "--data", "d", "--batch-size", "0"],
        ["eval", "--model", "m", "--data", "d", "--limit", "0"],
        ["eval", "--model", "m", "--data", "d", "--limit", "-3"],
        ["train", "weaver", "--model", "m", "--data", "d", "--learning-rate", "-1"],
        ["train", "weaver", "--model", "m", "--data", "d", "--save-every", "-1"],
        ["train", "weaver", "--model", "m", "--data", "d", "--learning-rate", "nan"],
        ["train", "weaver", "--model", "m", "--data", "d", "--reward-funcs", "task", "--reward-weights", "1", "2"],
    ],
)
def test_reported_bad_inputs(capsys, argv):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("memgen: error: ")


def test_ranges_hold_in_python_and_yaml_too(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size must be >= 1, got 0"):
        EvalConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"top_p must be > 0 and <= 1, got 1.5"):
        GenerateConfig(top_p=1.5)
    (tmp_path / "c.yaml").write_text("max_steps: 0\n")
    assert main(["train", "weaver", "--model", "m", "--data", "d", "--config", str(tmp_path / "c.yaml")]) == 2
    config = EvalConfig()
    config.limit = -1
    with pytest.raises(ConfigError, match="limit"):
        check_ranges(config)
