"""KodCode and BigCodeBench: loaders, code extraction, reference solutions in the sandbox, eval and GRPO."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memgen.data import DataError
from memgen.tasks import SandboxConfig, load_task
from memgen.tasks.code import missing_libraries, program_for, solution_names
from memgen.tasks.code_extract import complete_program, extract_code

pytestmark = pytest.mark.slow  # every test here trains, loads a real model or runs a subprocess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KODCODE = DATA / "kodcode"
BIGCODEBENCH = DATA / "bigcodebench" / "BigCodeBench.jsonl.gz"
needs_data = pytest.mark.skipif(not KODCODE.is_dir() or not BIGCODEBENCH.is_file(), reason="../shared/data missing")
SANDBOX = SandboxConfig(timeout=30, workers=2)


def _run(task, completions=None):
    records = task.records
    columns = {k: [r.columns[k] for r in records] for k in records[0].columns}
    completions = completions or [r.completion for r in records]
    return task.outcomes([r.prompt for r in records], completions, **columns)


# ---------------------------------------------------------------- extraction
def test_last_block_defining_the_required_names_wins():
    text = (
        "First a draft:\n```python\ndef f(x):\n    return 0\n```\nUsage:\n```python\nprint(f(1))\n```\n"
        "Final:\n```python\ndef helper():\n    return 1\n\ndef f(x):\n    return helper() + x\n```\nDone."
    )
    assert extract_code(text, ["f"]).startswith("def helper")
    assert extract_code(text, ["missing"]) == "def helper():\n    return 1\n\ndef f(x):\n    return helper() + x"


def test_unclosed_fence_and_no_fence():
    assert extract_code("```python\ndef f():\n    return 1", ["f"]) == "def f():\n    return 1"
    assert extract_code("def f():\n    return 2\n", ["f"]) == "def f():\n    return 2"
    assert extract_code("```\nx = 1\n```\n```py\ny = 2\n```") == "y = 2"


def test_complete_split_body_or_own_function():
    prompt = 'import math\nfrom random import shuffle\n\ndef task_func(x):\n    """Doc."""\n'
    assert complete_program(prompt, "    return math.sqrt(x)\n", "task_func") == prompt + "    return math.sqrt(x)\n"
    own = "```python\ndef task_func(x):\n    return math.floor(x)\n```"
    program = complete_program(prompt, own, "task_func")
    assert program.startswith("import math\nfrom random import shuffle\n") and program.endswith("math.floor(x)")


def test_solution_names_from_imports_or_the_reference():
    assert solution_names("from solution import a, b\nfrom solution import a\n", None) == ["a", "b"]
    tests = "import pytest\n\ndef test_x():\n    assert add(1, 2) == 3\n"
    assert solution_names(tests, "def helper():\n    pass\n\ndef add(a, b):\n    return a + b\n") == ["add"]
    assert solution_names(tests, None) is None


def test_missing_libraries_are_named():
    assert missing_libraries(["os", "json", "surely_not_a_module_xyz"]) == ["surely_not_a_module_xyz"]


# ---------------------------------------------------------------- loaders
def test_kodcode_malformed_items_report_file_and_index(tmp_path):
    bad = tmp_path / "k.json"
    bad.write_text(
        json.dumps(
            [
                {"instruction": "x", "response": "def f(): pass", "test_code": "from solution import f"},
                {"instruction": "y"},
            ]
        )
    )
    with pytest.raises(DataError, match=r"k\.json:\[1\]: needs 'instruction'"):
        load_task("kodcode", bad, sandbox=SANDBOX)
    with pytest.warns(UserWarning, match="skipped"):
        task = load_task("kodcode", bad, skip_malformed=True, sandbox=SANDBOX)
    assert len(task.records) == 1 and task.skipped and "k.json:[1]" in task.skipped[0]
    assert task.records[0].prompt == "x\n\nNote that the output function should be f.\n"


def test_split_is_refused_for_tasks_without_splits():
    with pytest.raises(DataError, match="no splits"):
        load_task("kodcode", KODCODE, split="instruct")


# ---------------------------------------------------------------- reference solutions
@needs_data
def test_every_kodcode_reference_solution_passes():
    task = load_task("kodcode", KODCODE, sandbox=SANDBOX)
    assert len(task.records) == 123 and task.unavailable == []  # scipy is in the test extra
    results = _run(task)
    failing = [(r.source, o.status, o.detail) for r, o in zip(task.records, results) if not o.passed]
    assert failing == []


@needs_data
def test_kodcode_wrong_answers_fail():
    task = load_task("kodcode", KODCODE, limit=6, sandbox=SANDBOX)
    wrong = [
        "```python\n"
        + "\n".join(f"def {n}(*args, **kwargs):\n    return None" for n in r.columns["required"])
        + "\n```"
        for r in task.records
    ]
    statuses = [o.status for o in _run(task, wrong)]
    assert statuses.count("passed") == 0 and "failed" in statuses


@needs_data
@pytest.mark.parametrize("split", ["complete", "instruct"])
def test_bigcodebench_references_pass_and_missing_libraries_are_listed(split):
    task = load_task("bigcodebench", BIGCODEBENCH, split=split, sandbox=SANDBOX)
    assert len(task.records) + len(task.unavailable) == 1140
    for line in task.unavailable:  # every task left out names a library this interpreter lacks
        task_id, _, reason = line.partition(": ")
        assert task_id.startswith("BigCodeBench/") and reason.endswith("not installed")
    # The first 12 tasks on the standard library alone, none of it networking, keep the run
    # short; `memgen sandbox check` runs them all (see the closing note / docs/benchmarks.md).
    offline = [
        r
        for r in task.records
        if all(lib in sys.stdlib_module_names for lib in r.columns["libs"])
        and not set(r.columns["libs"]) & NETWORK_MODULES
    ]
    task.records = offline[:12]
    results = _run(task)
    assert [(r.columns["task_id"], o.status) for r, o in zip(task.records, results) if not o.passed] == []


NETWORK_MODULES = {"socket", "ssl", "http", "urllib", "requests", "smtplib", "ftplib", "select"}


@needs_data
def test_program_for_bigcodebench_instruct_uses_the_fenced_code():
    task = load_task("bigcodebench", BIGCODEBENCH, split="instruct", limit=1, sandbox=SANDBOX)
    record = task.records[0]
    assert record.completion.startswith("```python\n")
    program = program_for(record.completion, record.columns)
    assert "class TestCases" in program.files["program.py"] and "```" not in program.files["program.py"]


# ---------------------------------------------------------------- eval and training on a tiny model
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from memgen.tiny import tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("code")
    tok = tiny_tokenizer()
    tiny_causal_lm(tok, hidden_size=32, num_layers=1, max_positions=4096).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


def _memgen(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "memgen", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_data
def test_eval_kodcode_reports_pass_at_1_timeouts_and_skips(tiny_base, tmp_path):
    out = tmp_path / "rows.jsonl"
    summary = json.loads(
        _memgen(
            "eval",
            "--model",
            str(tiny_base),
            "--task",
            "kodcode",
            "--data",
            str(KODCODE),
            "--limit",
            "4",
            "--max-new-tokens",
            "24",
            "--memory",
            "off",
            "--json",
            "--progress",
            "false",
            "--output",
            str(out),
            "--code-timeout",
            "20",
        )
    )
    assert summary["n"] == 4 and summary["pass@1"] == summary["accuracy"]
    assert summary["failed"] + summary["timeout"] + summary["crashed"] == 4 - round(4 * summary["pass@1"])
    assert summary["skipped"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] in ("passed", "failed", "timeout", "crashed") for r in rows)
    assert all(r["exec_seconds"] > 0 for r in rows)


@needs_data
def test_recipe_grpo_on_kodcode_with_sandboxed_rewards(tiny_base, tmp_path):
    from memgen.train.logging import read_metrics

    _memgen(
        "train",
        "weaver",
        "--method",
        "grpo",
        "--model",
        str(tiny_base),
        "--task",
        "kodcode",
        "--data",
        str(KODCODE),
        "--limit",
        "4",
        "--per-device-batch-size",
        "2",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "16",
        "--max-steps",
        "2",
        "--progress",
        "false",
        "--save-every",
        "0",
        "--tensorboard",
        "false",
        "--prompt-latents",
        "2",
        "--inference-latents",
        "2",
        "--lora-r",
        "4",
        "--max-prompt-tokens",
        "256",
        "--output-dir",
        str(tmp_path / "grpo"),
    )
    metrics = read_metrics(tmp_path / "grpo")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # every sampled answer ran in the sandbox, and the reward is its pass rate
        runs = sum(m[f"exec_{s}"] for s in ("passed", "failed", "timeout", "crashed"))
        assert runs == 2 * 2
        assert m["reward_mean"] == pytest.approx(m["exec_passed"] / runs)
    assert (tmp_path / "grpo" / "final" / "adapter_model.safetensors").is_file()
    # Trigger RL on the same task, from the GRPO weaver: the sandbox scores its rollouts too.
    _memgen(
        "train",
        "trigger",
        "--model",
        str(tiny_base),
        "--adapter",
        str(tmp_path / "grpo" / "final"),
        "--task",
        "kodcode",
        "--data",
        str(KODCODE),
        "--limit",
        "2",
        "--per-device-batch-size",
        "2",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "16",
        "--max-steps",
        "1",
        "--progress",
        "false",
        "--save-every",
        "0",
        "--tensorboard",
        "false",
        "--max-prompt-tokens",
        "256",
        "--output-dir",
        str(tmp_path / "trigger"),
    )
    (trigger,) = read_metrics(tmp_path / "trigger")
    assert sum(trigger[f"exec_{s}"] for s in ("passed", "failed", "timeout", "crashed")) == 4
    assert trigger["task_reward_mean"] == pytest.approx(trigger["exec_passed"] / 4)


@needs_data
def test_cli_sandbox_check_runs_references_and_lists_failures(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "sandbox",
            "check",
            "--task",
            "kodcode",
            "--data",
            str(KODCODE),
            "--limit",
            "5",
            "--progress",
            "false",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["summary"]["checked"] == 5 and report["summary"]["passed"] == 5 and report["failures"] == []
    # A broken reference makes it fail, with the item and the error named.
    items = json.loads(sorted(KODCODE.glob("*.json"))[0].read_text())[:2]
    items[1]["response"] = items[1]["response"] + "\nraise SystemExit(3)\n"
    (tmp_path / "k.json").write_text(json.dumps(items))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memgen",
            "sandbox",
            "check",
            "--task",
            "kodcode",
            "--data",
            str(tmp_path / "k.json"),
            "--progress",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "k.json:[1]: crashed" in done.stdout


@needs_data
def test_eval_bigcodebench_instruct_runs(tiny_base):
    summary = json.loads(
        _memgen(
            "eval",
            "--model",
            str(tiny_base),
            "--task",
            "bigcodebench",
            "--split",
            "instruct",
            "--data",
            str(BIGCODEBENCH),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--memory",
            "off",
            "--json",
            "--progress",
            "false",
        )
    )
    assert summary["n"] == 2 and summary["skipped"] > 0 and summary["task"] == "bigcodebench"
