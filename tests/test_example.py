"""Every example script runs, as a user would run it, and does what it prints (recipe-style: the real
script, recorded outcomes); the README's Python example runs too."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_example(name: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_runs_and_learns(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    losses = [float(x) for x in re.findall(r"completion NLL ([0-9.]+)", out)]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert "restored adapter reproduces generation: True" in out
    assert (tmp_path / "runs" / "quickstart-adapter" / "memgen_config.json").is_file()


def test_train_and_evaluate_learns_the_task_it_defines(tmp_path):
    out = run_example("train_and_evaluate.py", tmp_path)
    first, last, steps = re.search(r"SFT loss ([0-9.]+) -> ([0-9.]+) over (\d+) steps", out).groups()
    assert int(steps) == 60 and float(last) < 0.25 * float(first)
    before, after = map(float, re.search(r"records: ([0-9.]+) before, ([0-9.]+) after", out).groups())
    assert before == 0.0 and after >= 0.5
    assert (tmp_path / "runs" / "example-sft" / "final" / "memgen_config.json").is_file()


def test_agent_episode_plays_three_episodes_with_memory(tmp_path):
    out = run_example("agent_episode.py", tmp_path)
    episodes = re.findall(r"ledger-B: (\d+) turn\(s\), success=(True|False), ended by (\w+), (\d+) insertion", out)
    assert len(episodes) == 3
    assert all(int(turns) >= 1 and int(insertions) >= 1 for turns, _, _, insertions in episodes)


def test_sandbox_example_reports_each_outcome(tmp_path):
    out = run_example("sandbox.py", tmp_path)
    statuses = dict(re.findall(r"^(.+?)\s+-> (\w+)", out, re.M))
    assert statuses == {
        "passes": "passed",
        "fails": "failed",
        "reads /etc/hostname": "crashed",
        "loops forever": "timeout",
    }


def test_analysis_example_writes_the_report_and_ablates_every_cluster(tmp_path):
    out = run_example("analysis.py", tmp_path)
    for name in ("analysis.md", "analysis.json", "latents.png", "silhouette.png", "ablation.png"):
        assert (tmp_path / "runs" / "example-analysis" / name).is_file(), name
    sizes = [int(x) for x in re.search(r"K-means sizes \[([0-9, ]+)\]", out).group(1).split(",")]
    woven = int(re.search(r"(\d+) latents woven", out).group(1))
    assert len(sizes) == 3 and sum(sizes) == woven
    assert len(re.findall(r"withhold\s+cluster \d", out)) == 3


def test_the_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "readme-adapter" / "memgen_config.json").is_file()
