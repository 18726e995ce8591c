"""Code tasks: KodCode and BigCodeBench, scored by running the tests in the sandbox.

| task | file | prompt | program run | reward |
| --- | --- | --- | --- | --- |
| ``kodcode`` | KodCode JSON list(s) or JSONL: ``instruction``/``question``, ``response``/``solution``, pytest ``test_code``/``test`` (``from solution import f``); a file or a directory of them | the instruction, then ``Note that the output function should be f.`` | ``solution.py`` (extracted code) and ``test_solution.py`` under pytest | 1.0 iff every test passes |
| ``bigcodebench`` | ``BigCodeBench.jsonl(.gz)``; ``split`` complete (default) or instruct | complete: ``complete_prompt`` (imports, signature, docstring) to continue; instruct: ``instruct_prompt`` | code plus the ``TestCases`` unittest class, run by a small loader | 1.0 iff the suite succeeds |

Departures, and why:

* KodCode's questions do not name the function the tests import. The authors' code
  renames the first function of the answer to it; we name it in the prompt instead
  (renaming the first ``def`` breaks answers whose helper comes first). The full
  KodCode-Light-RL-10K is not available offline; a local copy in the same fields loads.
* The authors score KodCode by the fraction of tests passed; the reward here is 1.0 only
  when all pass, as the KodCode and BigCodeBench papers count pass@1.
* BigCodeBench tasks whose libraries are not importable here are left out and listed in
  ``Task.unavailable`` (never scored as failures). Tasks that need the network are kept:
  the sandbox has none, so they fail, as they do in any offline run.

Which code of a completion runs is decided by :mod:`memgen.tasks.code_extract`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError, Record, read_jsonl, skip_or_raise
from .code_extract import complete_program, extract_code
from .rewards import completion_text
from .sandbox import Program, Sandbox, SandboxConfig, SandboxResult

BIGCODEBENCH_SPLITS = ("complete", "instruct")
# bigcodebench's own stop strings for completing a function body.
BIGCODEBENCH_COMPLETE_STOP = ["\nif __name__", "\ndef main(", "\nprint(", "\n```"]

_PYTEST_ARGS = [
    "-m",
    "pytest",
    "-q",
    "-x",
    "-p",
    "no:cacheprovider",
    "--no-header",
    "-o",
    "addopts=",
    "test_solution.py",
]
# Only functions written in the test file are tests. Names the tests import (KodCode has
# ``from heapq import merge as test_merge``) or get from ``from solution import *`` are not,
# so a solution cannot add tests of its own.
_PYTEST_CONFTEST = """\
import inspect


def pytest_pycollect_makeitem(collector, name, obj):
    module = getattr(collector, "module", None)
    if inspect.isfunction(obj) and module is not None and obj.__module__ != module.__name__:
        return []
"""
# A pass needs the run's own report as well as exit 0, so a program that exits early with
# status 0 (``os._exit(0)`` on import) is not scored as passing.
_PYTEST_PASSED = r"^\d+ passed(?!.*\b(failed|error))"
_UNITTEST_PASSED = r"^memgen-tests: ran [1-9]\d* failures 0 errors 0$"
# Loads the program as a module (as bigcodebench does), then runs its TestCases; exit 3 when
# the program cannot even be loaded, so a crash is told apart from failing tests.
_UNITTEST_RUNNER = """\
import sys, traceback, types, unittest
module = types.ModuleType("__test__")
module.__file__ = "program.py"
sys.modules["__test__"] = module
try:
    with open("program.py") as handle:
        exec(compile(handle.read(), "program.py", "exec"), module.__dict__)
    suite = unittest.TestLoader().loadTestsFromTestCase(module.TestCases)
except BaseException:
    traceback.print_exc()
    sys.exit(3)
result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(suite)
print(f"memgen-tests: ran {result.testsRun} failures {len(result.failures)} errors {len(result.errors)}")
sys.exit(0 if result.wasSuccessful() else 1)
"""


# ---------------------------------------------------------------- programs
def kodcode_program(code: str, test_code: str) -> Program:
    """pytest on ``test_solution.py``, which starts with ``from solution import *`` (KodCode's convention)."""
    tests = "from solution import *  # noqa\n" + test_code
    return Program(
        {"solution.py": code, "test_solution.py": tests, "conftest.py": _PYTEST_CONFTEST},
        list(_PYTEST_ARGS),
        (1,),
        {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        _PYTEST_PASSED,
    )


def unittest_program(code: str, test: str) -> Program:
    return Program(
        {"program.py": code + "\n\n" + test + "\n", "run_tests.py": _UNITTEST_RUNNER},
        ["run_tests.py"],
        (1,),
        {},
        _UNITTEST_PASSED,
    )


def program_for(completion: str, columns: dict) -> Program:
    """The program that scores one completion of a code task (``columns``: the record's)."""
    benchmark = columns["benchmark"]
    if benchmark == "kodcode":
        return kodcode_program(extract_code(completion, columns["required"]), columns["test_code"])
    if benchmark == "bigcodebench":
        if columns["split"] == "complete":
            code = complete_program(columns["prompt_code"], completion, columns["entry_point"])
        else:
            code = extract_code(completion, [columns["entry_point"]])
        return unittest_program(code, columns["test"])
    raise DataError(f"unknown code benchmark {benchmark!r}")


# ---------------------------------------------------------------- reward
@dataclass
class CodeReward:
    """Reward in TRL's signature: 1.0 iff the completion's program passes its tests in the sandbox.

    ``outcomes`` gives the full :class:`SandboxResult` per completion (status, seconds, the
    limit hit, output tails), for evaluation tables. The sandbox starts at construction, so
    a platform that cannot isolate programs is reported when the task loads.
    """

    config: SandboxConfig = field(default_factory=SandboxConfig)
    __name__ = "code_reward"

    def __post_init__(self) -> None:
        self.sandbox = Sandbox(self.config)

    def outcomes(self, prompts, completions, **columns) -> list[SandboxResult]:
        keys = list(columns)
        programs = [
            program_for(completion_text(c), {k: columns[k][i] for k in keys}) for i, c in enumerate(completions)
        ]
        return self.sandbox.run_many(programs)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [1.0 if r.passed else 0.0 for r in self.outcomes(prompts, completions, **columns)]


# ---------------------------------------------------------------- KodCode
def _parse(code: str) -> ast.Module | None:
    with warnings.catch_warnings():  # benchmark code has invalid escapes such as "\d"; not ours to report
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError):
            return None


def imported_modules(code: str) -> set[str]:
    """Top-level modules a piece of code imports (absolute imports only)."""
    tree = _parse(code)
    modules: set[str] = set()
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def solution_names(test_code: str, reference: str | None) -> list[str] | None:
    """The names the tests take from ``solution``; None when they cannot be told.

    Most KodCode tests say ``from solution import f``. About a third use the names bare
    (the test file runs after ``from solution import *``); their names are those the
    reference solution defines and the tests use.
    """
    tree = _parse(test_code)
    if tree is None:
        return None
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "solution":
            names.extend(a.name for a in node.names if a.name != "*")
    if names:
        return list(dict.fromkeys(names))
    if not reference:
        return None
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    defined_in_tests = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    ref = _parse(reference)
    ordered = [n.name for n in (ref.body if ref else ()) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return [n for n in ordered if n in used and n not in defined_in_tests]  # may be empty: self-contained tests


def _kodcode_items(path: Path, skip_malformed: bool, skipped: list[str]) -> list[tuple[str, object]]:
    """``(source, item)`` for every item of a KodCode file, or of every file in a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: no .json or .jsonl files")
        return [item for f in files for item in _kodcode_items(f, skip_malformed, skipped)]
    if path.suffix == ".jsonl":
        rows, bad = read_jsonl(path, skip_malformed)
        skipped.extend(bad)
        return [(f"{path}:{lineno}", obj) for lineno, obj in rows]
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of KodCode items")
    return [(f"{path}:[{i}]", item) for i, item in enumerate(data)]


def kodcode_prompt(instruction: str, names: list[str]) -> str:
    note = f"\n\nNote that the output function should be {', '.join(names)}." if names else ""
    return f"{instruction.strip()}{note}\n"


def kodcode_records(path: Path, skip_malformed: bool = False) -> tuple[list[Record], list[str], list[str]]:
    """Records, malformed items skipped, and items left out for libraries not installed."""
    if importlib.util.find_spec("pytest") is None:
        raise DataError("kodcode's tests run under pytest, which is not installed: pip install 'memgen[code]'")
    records, skipped, unavailable = [], [], []
    for source, item in _kodcode_items(path, skip_malformed, skipped):
        item = item if isinstance(item, dict) else {}
        instruction = item.get("instruction") or item.get("question")
        solution = item.get("response") or item.get("solution")
        test_code = item.get("test_code") or item.get("test")
        if not all(isinstance(v, str) and v.strip() for v in (instruction, test_code)):
            skip_or_raise(
                f"{source}: needs 'instruction' (or 'question') and 'test_code' (or 'test')", skip_malformed, skipped
            )
            continue
        reference = solution.strip() if isinstance(solution, str) and solution.strip() else None
        names = solution_names(test_code, reference)
        if names is None:
            skip_or_raise(
                f"{source}: cannot tell which names the tests take from 'solution' (no 'from solution "
                "import ...' and no reference solution defining them)",
                skip_malformed,
                skipped,
            )
            continue
        needed = (imported_modules(test_code) | imported_modules(reference or "")) - {"solution"}
        absent = missing_libraries(sorted(needed))
        if absent:
            unavailable.append(f"{source}: {', '.join(absent)} not installed")
            continue
        completion = f"```python\n{reference}\n```" if reference else None
        records.append(
            Record(
                kodcode_prompt(instruction, names),
                completion,
                {"benchmark": "kodcode", "test_code": test_code, "required": names, "reference": reference},
                source,
            )
        )
    return records, skipped, unavailable


# ---------------------------------------------------------------- BigCodeBench
def missing_libraries(libs: list[str]) -> list[str]:
    """The top-level modules in ``libs`` that this interpreter cannot import."""
    return [lib for lib in libs if importlib.util.find_spec(lib.split(".")[0]) is None]


def bigcodebench_records(
    path: Path, split: str = "complete", skip_malformed: bool = False
) -> tuple[list[Record], list[str], list[str]]:
    """Records, malformed lines skipped, and ``task_id: missing libs`` of tasks left out."""
    if split not in BIGCODEBENCH_SPLITS:
        raise DataError(f"bigcodebench split must be one of {BIGCODEBENCH_SPLITS}, got {split!r}")
    fields = (
        "task_id",
        "complete_prompt",
        "instruct_prompt",
        "canonical_solution",
        "code_prompt",
        "test",
        "entry_point",
    )

    def validate(obj: dict) -> None:
        missing = [f for f in fields if not isinstance(obj.get(f), str)]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        libs = obj.get("libs") or []
        obj["libs"] = ast.literal_eval(libs) if isinstance(libs, str) else libs  # stored as a list's repr

    rows, skipped = read_jsonl(path, skip_malformed, validate)
    records, unavailable = [], []
    for lineno, obj in rows:
        libs = obj["libs"]
        # ``libs`` lists what the solution uses; the tests may need more (pandas, faker, ...).
        needed = set(libs) | imported_modules(obj["test"]) | imported_modules(obj["code_prompt"])
        absent = missing_libraries(sorted(needed))
        if absent:
            unavailable.append(f"{obj['task_id']}: {', '.join(absent)} not installed")
            continue
        columns = {
            "benchmark": "bigcodebench",
            "split": split,
            "task_id": obj["task_id"],
            "test": obj["test"],
            "entry_point": obj["entry_point"],
            "prompt_code": obj["complete_prompt"],
            "libs": libs,
        }
        if split == "complete":
            record = Record(obj["complete_prompt"], obj["canonical_solution"], columns, f"{path}:{lineno}")
        else:
            solution = obj["code_prompt"] + obj["canonical_solution"]
            record = Record(
                obj["instruct_prompt"].rstrip() + "\n", f"```python\n{solution}\n```", columns, f"{path}:{lineno}"
            )
        records.append(record)
    return records, skipped, unavailable
