"""The sandbox contains hostile programs: each test runs one and checks the host is unharmed.

Every program carries a unique token in its command line (forked children inherit it), and
after each test no process anywhere may still show it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from memgen.tasks.sandbox import Program, Sandbox, SandboxConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout=4, memory_mb=1024, file_size_mb=64, disk_mb=128, processes=32, workers=2))


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


@pytest.fixture
def run(sandbox):
    """run(code) -> SandboxResult; afterwards no process of the run may be left."""
    tokens = []

    def go(code: str, **kw):
        token = f"memgen-test-{uuid.uuid4().hex}"
        tokens.append(token)
        return sandbox.run(Program({}, ["-c", f"# {token}\n{code}"], **kw))

    yield go
    for token in tokens:
        assert _processes_with(token) == [], "a sandboxed process outlived its run"


def test_mechanisms_in_force_are_named(sandbox):
    # The constructor refuses to run without them (allow_weaker is off), so each is present.
    assert set(sandbox.mechanisms) >= {"network", "filesystem", "signals", "processes", "cleanup"}
    assert not any(v.startswith("none") for v in sandbox.mechanisms.values())


def test_passing_program_and_its_output(run):
    result = run("print('hello'); import sys; print('oops', file=sys.stderr)")
    assert result.status == "passed" and result.stdout == "hello\n" and result.stderr == "oops\n"


def test_infinite_loop_times_out(run, sandbox):
    began = time.monotonic()
    result = run("while True: pass")
    assert result.status == "timeout" and result.limit == "time"
    assert time.monotonic() - began < sandbox.config.timeout + 3


def test_fork_bomb_is_contained(run):
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout"
    # The host can still start processes.
    assert subprocess.run(["true"]).returncode == 0


def test_forked_child_that_leaves_the_session_dies_with_the_run(run):
    result = run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                 "else:\n    print('parent done')")
    assert result.status == "passed"  # the fixture checks the setsid child is gone too


def test_allocating_10_gb_is_refused(run):
    result = run("block = bytearray(10 * 1024 ** 3)")
    assert result.status == "crashed" and result.limit == "memory" and "MemoryError" in result.stderr


def test_writing_1_gb_is_stopped_at_the_file_size_limit(run):
    result = run("chunk = b'x' * (1 << 20)\nwith open('big.bin', 'wb') as f:\n"
                 "    for _ in range(1024):\n        f.write(chunk)")
    assert result.status == "crashed" and result.limit == "file_size"


def test_printing_100_mb_is_cut_and_the_host_keeps_only_a_tail(run, sandbox):
    result = run("import sys\nline = 'y' * 1023 + '\\n'\nfor _ in range(100 * 1024):\n    sys.stdout.write(line)")
    assert result.status == "crashed" and result.limit == "file_size"
    assert len(result.stdout) <= sandbox.config.output_chars


def test_writing_outside_the_work_directory_fails(run, tmp_path):
    targets = [REPO / f"sandbox-escape-{uuid.uuid4().hex}", tmp_path / "escape.txt", Path("/tmp") / "escape.txt",
               Path.home() / "escape.txt"]
    try:
        code = "".join(f"try:\n    open({str(t)!r}, 'w').write('pwned'); print('wrote')\n"
                       f"except OSError as e:\n    print(type(e).__name__)\n" for t in targets)
        result = run(code)
        # The repository and $HOME are read-only or hidden; the host's /tmp is not even visible
        # (tmp_path lives there), and /tmp itself is a private tmpfs that vanishes with the run.
        assert result.stdout.split() == ["PermissionError", "FileNotFoundError", "wrote", "PermissionError"]
        assert not any(t.exists() for t in targets)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_deleting_files_in_the_working_tree_fails(run, tmp_path):
    canary = REPO / f".sandbox-canary-{uuid.uuid4().hex}"
    canary.write_text("keep me")
    outside = tmp_path / "keep.txt"
    outside.write_text("keep me too")
    try:
        result = run(f"import os, shutil\nos.remove({str(canary)!r})")
        assert result.status == "crashed" and "PermissionError" in result.stderr
        result = run(f"import shutil\nshutil.rmtree({str(tmp_path)!r})")
        assert result.status == "crashed"
        assert canary.read_text() == "keep me" and outside.read_text() == "keep me too"
    finally:
        canary.unlink(missing_ok=True)


def test_secrets_in_home_and_environment_stay_hidden(run, monkeypatch):
    secret = f"SECRET-{uuid.uuid4().hex}"
    monkeypatch.setenv("MEMGEN_TEST_SECRET", secret)
    # A private key outside /tmp (the host's /tmp is not even visible inside), as ~/.ssh would be.
    home = REPO / f".sandbox-home-{uuid.uuid4().hex}"
    (home / ".ssh").mkdir(parents=True)
    try:
        key = home / ".ssh" / "id_ed25519"
        key.write_text(secret)
        key.chmod(0o600)
        attempts = [f"open({str(key)!r}).read()", f"os.listdir({str(Path.home())!r})",
                    f"os.listdir({str(Path.home() / '.ssh')!r})", "os.listdir(os.path.expanduser('~/.ssh'))",
                    "open(f'/proc/{os.getppid()}/environ').read()",
                    f"open('/proc/{os.getpid()}/environ', 'rb').read().decode()", "dict(os.environ)"]
        code = "import os\n" + "".join(f"try:\n    print({a})\nexcept Exception as e:\n    print(type(e).__name__)\n"
                                       for a in attempts)
        result = run(code)
    finally:
        import shutil

        shutil.rmtree(home)
    assert result.status == "passed"
    assert secret not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # ~ inside is the work directory; the host's processes are not even visible (own /proc).
    assert lines[:2] == ["PermissionError", "PermissionError"]
    assert lines[2] in ("PermissionError", "FileNotFoundError")  # the host may have no ~/.ssh
    assert lines[3:6] == ["FileNotFoundError"] * 3
    assert "MEMGEN_TEST_SECRET" not in lines[6]


def test_sockets_to_localhost_and_outside_fail(run):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = ("import socket\nfor target in [('127.0.0.1', %d), ('1.1.1.1', 53)]:\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try:\n        s.connect(target); print('connected')\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "try:\n    u.sendto(b'x', ('1.1.1.1', 53)); print('sent')\n"
            "except OSError as e:\n    print('refused', e.errno)\n") % port
    try:
        result = run(code)
        assert result.status == "passed"
        assert result.stdout.count("refused") == 3 and "connected" not in result.stdout and "sent" not in result.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_killing_the_parent_or_other_processes_fails(run):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The host (this test process, the trainer in real use) and an unrelated process of the
        # same user. Inside its PID namespace the program cannot even name its launcher.
        code = ("import os, signal\n"
                f"for pid in [{victim.pid}, {os.getpid()}]:\n"
                "    try:\n        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
                "    except OSError as e:\n        print(type(e).__name__)\n")
        result = run(code)
        assert result.status == "passed" and "killed" not in result.stdout
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_syntax_error_is_a_crash(run):
    result = run("def broken(:\n    pass")
    assert result.status == "crashed" and result.exit_code == 1 and "SyntaxError" in result.stderr


def test_early_exit_zero_without_the_runner_report_does_not_pass(run):
    result = run("import os\nos._exit(0)", passed_pattern=r"^\d+ passed")
    assert result.status == "crashed" and "report" in result.detail


def test_pool_runs_at_most_workers_programs_at_once(sandbox, monkeypatch):
    active, peak = [0], [0]
    inner = Sandbox.run

    def counting(self, program, **kw):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return inner(self, program, **kw)
        finally:
            active[0] -= 1

    monkeypatch.setattr(Sandbox, "run", counting)
    results = sandbox.run_many([Program({}, ["-c", f"import time; time.sleep(0.2); print({i})"]) for i in range(6)])
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]
    assert peak[0] == sandbox.config.workers == 2


def test_no_temporary_directory_is_left(sandbox, tmp_path):
    config = SandboxConfig(timeout=4, tmp_root=str(tmp_path))
    Sandbox(config).run(Program({"a.txt": "x"}, ["-c", "open('b.txt', 'w').write('y')"]))
    assert list(tmp_path.iterdir()) == []


def test_killed_run_leaves_no_cgroup_behind(sandbox, monkeypatch):
    if sandbox._cgroups is None:
        pytest.skip("no pids cgroup in use (not root)")
    made = []
    create = sandbox._cgroups.create
    monkeypatch.setattr(sandbox._cgroups, "create", lambda n: made.append(create(n)) or made[-1])
    sandbox.run(Program({}, ["-c", "while True: pass"]))
    assert len(made) == 1 and not made[0].exists()


def test_signal_of_the_program_is_reported(run):
    result = run("import ctypes\nctypes.string_at(0)")
    assert result.status == "crashed" and result.signal == signal.SIGSEGV and "SIGSEGV" in result.detail


def test_missing_mechanism_is_refused_unless_weaker_isolation_is_allowed(monkeypatch):
    from memgen.tasks import sandbox as sandbox_module
    from memgen.tasks.sandbox import SandboxError

    if os.geteuid() != 0:
        pytest.skip("the pids cgroup is root's process limit")
    monkeypatch.setattr(sandbox_module._PidsCgroups, "find", classmethod(lambda cls: None))
    with pytest.raises(SandboxError, match="processes: none: running as root without a writable pids cgroup"):
        Sandbox(SandboxConfig(timeout=4))
    weaker = Sandbox(SandboxConfig(timeout=4, allow_weaker=True))
    assert weaker.mechanisms["processes"].startswith("none") and weaker.mechanisms["network"].startswith("network")


def test_cli_sandbox_info_names_every_mechanism():
    done = subprocess.run([sys.executable, "-m", "memgen", "sandbox", "info"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    assert set(json.loads(done.stdout)) >= {"network", "filesystem", "signals", "processes", "cleanup", "proc"}
