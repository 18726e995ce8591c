"""The README's main command runs the quickstart end to end (recipe-style: the real script, recorded outcomes)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_learns(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    losses = [float(x) for x in re.findall(r"completion NLL ([0-9.]+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert "restored adapter reproduces generation: True" in proc.stdout
    assert (tmp_path / "runs" / "quickstart-adapter" / "memgen_config.json").is_file()
