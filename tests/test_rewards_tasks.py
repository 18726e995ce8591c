"""Rewards and task adapters on real benchmark files from ../shared/data (read in place)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memgen.data import DataError
from memgen.tasks import load_task
from memgen.tasks.rewards import (
    choice_reward,
    combine_rewards,
    exact_match_reward,
    f1_reward,
    final_answer,
    math_equal,
    math_reward,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


@pytest.mark.parametrize(
    "prediction, gold, equal",
    [
        ("0.5", r"\frac12", True),
        (r"\frac{1}{2}", "0.5", True),
        ("1,000", "1000", True),
        ("1000", "1,000", True),
        (r"\dfrac{3}{4}", "0.75", True),
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        ("0.5", "0.51", False),
        ("3", "4", False),
        (None, "4", False),
    ],
)
def test_math_equivalence(prediction, gold, equal):
    assert math_equal(prediction, gold) is equal


def test_gsm8k_reference_solutions_score_one_and_wrong_answers_zero():
    task = load_task("gsm8k", DATA / "gsm8k" / "test.jsonl", limit=25)
    assert len(task.records) == 25 and task.records[0].source.endswith("test.jsonl:1")
    answers = [r.columns["answer"] for r in task.records]
    assert task.reward(None, [r.completion for r in task.records], answer=answers) == [1.0] * 25
    formatted = [f"so she makes {int(a):,} dollars. #### {int(a):,}" for a in answers]
    assert task.reward(None, formatted, answer=answers) == [1.0] * 25
    wrong = [f"The answer is {int(a) + 1}." for a in answers]
    assert task.reward(None, wrong, answer=answers) == [0.0] * 25


def test_math500_answers_and_equivalent_forms():
    task = load_task("math500", DATA / "math" / "math500.jsonl")
    assert len(task.records) == 500
    sample = task.records[:40]
    answers = [r.columns["answer"] for r in sample]
    boxed = [f"Therefore the answer is $\\boxed{{{a}}}$." for a in answers]
    assert math_reward(None, boxed, answers) == [1.0] * len(sample)
    assert math_reward(None, ["$\\boxed{-12345.678}$"] * len(sample), answers) == [0.0] * len(sample)
    half = next(r for r in task.records if r.columns["answer"].replace(" ", "") in (r"\frac{1}{2}", r"\frac12"))
    assert math_reward(None, ["The answer is \\boxed{0.5}"], [half.columns["answer"]]) == [1.0]


def test_math_test_split_takes_the_last_boxed_answer():
    task = load_task("math", DATA / "math" / "test.jsonl", limit=30)
    for record in task.records:
        assert final_answer(record.completion) == record.columns["answer"].strip()
    assert (
        math_reward(None, [r.completion for r in task.records], [r.columns["answer"] for r in task.records])
        == [1.0] * 30
    )


def test_gpqa_read_from_zip_with_seeded_shuffle(tmp_path):
    before = set(os.listdir(Path(__file__).resolve().parents[1]))
    diamond = load_task("gpqa", DATA / "gpqa" / "gpqa.zip")
    main = load_task("gpqa", f"{DATA / 'gpqa' / 'gpqa.zip'}:main")
    assert len(diamond.records) == 198 and len(main.records) == 448
    again = load_task("gpqa", DATA / "gpqa" / "gpqa.zip")
    other_seed = load_task("gpqa", DATA / "gpqa" / "gpqa.zip", seed=1)
    letters = [r.columns["answer"] for r in diamond.records]
    assert letters == [r.columns["answer"] for r in again.records]
    assert letters != [r.columns["answer"] for r in other_seed.records]
    assert set(letters) == {"A", "B", "C", "D"}
    assert choice_reward(None, [f"Answer: {a}" for a in letters], letters) == [1.0] * 198
    assert choice_reward(None, [r.completion for r in diamond.records], letters) == [1.0] * 198
    shifted = ["ABCD"[("ABCD".index(a) + 1) % 4] for a in letters]
    assert choice_reward(None, [f"The answer is ({s})" for s in shifted], letters) == [0.0] * 198
    assert set(os.listdir(Path(__file__).resolve().parents[1])) == before  # nothing unpacked into the repo


def test_triviaqa_exact_match_and_f1_over_aliases():
    task = load_task("qa", DATA / "triviaqa" / "sample.json")
    aliases = [task.records[0].columns["aliases"]]
    assert "Sunset Boulevard" in aliases[0]
    assert exact_match_reward(None, ["Sunset Blvd."], aliases) == [1.0]
    assert exact_match_reward(None, ["The answer is sunset boulevard"], aliases) == [1.0]
    assert exact_match_reward(None, ["Cats"], aliases) == [0.0]
    assert f1_reward(None, ["Sunset Strip"], aliases) == [pytest.approx(0.5)]
    assert f1_reward(None, ["Cats"], aliases) == [0.0]


def test_rewards_combine_with_weights():
    combined = combine_rewards([exact_match_reward, f1_reward], [1.0, 0.5])
    assert combined(None, ["Sunset Strip"], aliases=[["Sunset Boulevard"]]) == [pytest.approx(0.25)]


def test_malformed_task_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "gsm.jsonl"
    lines = (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([lines[0], '{"question": "no answer"}', lines[1], "oops", lines[2]]) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: missing or empty field"):
        load_task("gsm8k", bad)
    with pytest.warns(UserWarning, match="skipped"):
        assert len(load_task("gsm8k", bad, skip_malformed=True).records) == 3


@pytest.mark.slow
def test_eval_cli_reports_and_writes_jsonl(tmp_path, tok):
    from conftest import make_base

    make_base(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "eval.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "eval",
            "--model",
            str(tmp_path / "base"),
            "--task",
            "gsm8k",
            "--data",
            str(DATA / "gsm8k" / "test.jsonl"),
            "--limit",
            "4",
            "--memory",
            "always",
            "--max-new-tokens",
            "16",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--progress",
            "false",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n"] == 4 and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["mean_insertions"] >= 1.0  # at least the prompt-end insertion
    assert summary["seconds_per_answer"] > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "completion", "reward", "insertions", "seconds"} <= set(rows[0])
