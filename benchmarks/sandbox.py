"""Sandbox throughput and overhead on KodCode's tests, against the same tests with no isolation. Prints JSON.

Every KodCode reference solution (``../shared/data/kodcode``) runs with its pytest file
twice per round, in the same process:

- ``plain``: ``python -I -m pytest ...`` in a fresh temporary directory, with the same files,
  arguments and environment as the sandbox gives, but no launcher, namespaces, minimal root,
  uid change, Landlock or rlimits;
- ``sandbox``: :meth:`memgen.tasks.Sandbox.run`.

Overhead per execution is measured sequentially with the two runs of each program
interleaved (plain, sandbox, plain, ...), so drift in the machine's speed hits both alike;
throughput is executions per second with ``--workers`` programs in flight for each mode.
Target: overhead under 50 ms per execution.

    python benchmarks/sandbox.py [--data ../shared/data/kodcode] [--workers 2] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from memgen.precision import cpu_capability
from memgen.tasks import Sandbox, SandboxConfig, load_task
from memgen.tasks.code import program_for

TARGET_OVERHEAD_MS = 50.0


def run_plain(sandbox: Sandbox, program) -> float:
    """The program with no isolation at all; returns seconds, checks it passed."""
    workdir = tempfile.mkdtemp(prefix="memgen-plain-")
    try:
        for name, text in program.files.items():
            Path(workdir, name).write_text(text)
        env = sandbox._spec(program, workdir, -1)["env"]
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-I", *program.args], cwd=workdir, env=env, capture_output=True)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"plain run failed: {done.stdout[-500:]!r}")
        return seconds
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_sandboxed(sandbox: Sandbox, program) -> float:
    began = time.perf_counter()
    result = sandbox.run(program)
    seconds = time.perf_counter() - began
    if not result.passed:
        raise RuntimeError(f"sandboxed run failed: {result.detail}")
    return seconds


def throughput(fn, programs, workers: int) -> float:
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, programs))
    return len(programs) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "kodcode"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="4 programs: checks the script runs (CI)")
    args = parser.parse_args()
    if args.quick:
        args.limit = 4

    task = load_task("kodcode", args.data, limit=args.limit, sandbox=SandboxConfig(timeout=30, workers=args.workers))
    sandbox = task.reward.sandbox
    programs = [program_for(r.completion, r.columns) for r in task.records]
    run_plain(sandbox, programs[0])  # warm the page cache for both
    run_sandboxed(sandbox, programs[0])

    plain, boxed = [], []
    for program in programs:
        plain.append(run_plain(sandbox, program))
        boxed.append(run_sandboxed(sandbox, program))
    overhead = [(b - p) * 1000 for p, b in zip(plain, boxed)]
    plain_rate = throughput(lambda p: run_plain(sandbox, p), programs, args.workers)
    boxed_rate = throughput(lambda p: run_sandboxed(sandbox, p), programs, args.workers)
    print(
        json.dumps(
            {
                "benchmark": "sandbox_kodcode",
                "programs": len(programs),
                "plain_ms_median": statistics.median(plain) * 1000,
                "sandbox_ms_median": statistics.median(boxed) * 1000,
                "overhead_ms_median": statistics.median(overhead),
                "overhead_ms_mean": statistics.mean(overhead),
                "overhead_ms_p90": statistics.quantiles(overhead, n=10)[-1],
                "target_overhead_ms": TARGET_OVERHEAD_MS,
                "target_met": statistics.median(overhead) < TARGET_OVERHEAD_MS,
                "workers": args.workers,
                "plain_executions_per_s": plain_rate,
                "sandbox_executions_per_s": boxed_rate,
                "throughput_ratio": boxed_rate / plain_rate,
                "mechanisms": sandbox.mechanisms,
                "cpu": platform.processor() or platform.machine(),
                "cpu_capability": cpu_capability(),
                "cores": os.cpu_count(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
