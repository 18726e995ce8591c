"""Run untrusted programs under kernel-enforced isolation: a passing test, a failing one, and an escape attempt.

``memgen sandbox info`` says what this machine enforces (namespaces, Landlock, seccomp, rlimits).
Code tasks (KodCode, BigCodeBench) run every generated program this way.
"""

from memgen.tasks import Program, Sandbox, SandboxConfig

sandbox = Sandbox(SandboxConfig(timeout=10, workers=2))
solution = "def add(a, b):\n    return a + b\n"
programs = {
    "passes": Program({"check.py": solution + "assert add(2, 3) == 5\n"}, ["check.py"]),
    "fails": Program({"check.py": solution + "assert add(2, 3) == 6\n"}, ["check.py"], failure_exit_codes=(1,)),
    "reads /etc/hostname": Program({"escape.py": "print(open('/etc/hostname').read())\n"}, ["escape.py"]),
    "loops forever": Program({"spin.py": "while True:\n    pass\n"}, ["spin.py"]),
}
for name, result in zip(programs, sandbox.run_many(list(programs.values()))):
    print(f"{name:20} -> {result.status:8} limit={result.limit} {result.stderr.strip()[-70:]!r}")
