"""The sandbox contains hostile programs: each test runs one and checks the host is unharmed.

Every program carries a unique token in its command line (forked children inherit it), and
after each test no process anywhere may still show it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    assert set(sandbox.mechanisms) >= {
        "network",
        "unix_sockets",
        "filesystem",
        "uid",
        "signals",
        "processes",
        "cleanup",
    }
    assert not any(v.startswith("none") for v in sandbox.mechanisms.values())


def test_passing_program_and_its_output(run):
    result = run("print('hello'); import sys; print('oops', file=sys.stderr)")
    assert result.status == "passed" and result.stdout == "hello\n" and result.stderr == "oops\n"


@pytest.mark.slow
def test_infinite_loop_times_out(run, sandbox):
    began = time.monotonic()
    result = run("while True: pass")
    assert result.status == "timeout" and result.limit == "time"
    assert time.monotonic() - began < sandbox.config.timeout + 3


@pytest.mark.slow
def test_fork_bomb_is_contained(run):
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.status == "timeout"
    # The host can still start processes.
    assert subprocess.run(["true"]).returncode == 0


def test_forked_child_that_leaves_the_session_dies_with_the_run(run):
    result = run(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    print('parent done')"
    )
    assert result.status == "passed"  # the fixture checks the setsid child is gone too


def test_allocating_10_gb_is_refused(run):
    result = run("block = bytearray(10 * 1024 ** 3)")
    assert result.status == "crashed" and result.limit == "memory" and "MemoryError" in result.stderr


def test_writing_1_gb_is_stopped_at_the_file_size_limit(run):
    result = run(
        "chunk = b'x' * (1 << 20)\nwith open('big.bin', 'wb') as f:\n    for _ in range(1024):\n        f.write(chunk)"
    )
    assert result.status == "crashed" and result.limit == "file_size"


def test_printing_100_mb_is_cut_and_the_host_keeps_only_a_tail(run, sandbox):
    result = run("import sys\nline = 'y' * 1023 + '\\n'\nfor _ in range(100 * 1024):\n    sys.stdout.write(line)")
    assert result.status == "crashed" and result.limit == "file_size"
    assert len(result.stdout) <= sandbox.config.output_chars


def test_writing_outside_the_work_directory_fails(run, tmp_path):
    targets = [
        REPO / f"sandbox-escape-{uuid.uuid4().hex}",
        tmp_path / "escape.txt",
        Path("/tmp") / "escape.txt",
        Path.home() / "escape.txt",
    ]
    try:
        code = "import errno\n" + "".join(
            f"try:\n    open({str(t)!r}, 'w').write('pwned'); print('wrote')\n"
            f"except OSError as e:\n    print(errno.errorcode[e.errno])\n"
            for t in targets
        )
        result = run(code)
        # The repository and $HOME are absent, read-only or denied; the host's /tmp is not even
        # visible (tmp_path lives there), and /tmp itself is a private tmpfs that vanishes with the run.
        written = result.stdout.split()
        assert written[0] in ("EACCES", "EROFS", "ENOENT") and written[3] in ("EACCES", "EROFS", "ENOENT")
        assert written[1:3] == ["ENOENT", "wrote"]
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
        assert result.status == "crashed"
        # Denied, read-only, or not even there (the repository is not in the sandbox's root).
        assert any(e in result.stderr for e in ("PermissionError", "Read-only file system", "FileNotFoundError"))
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
        attempts = [
            f"open({str(key)!r}).read()",
            f"os.listdir({str(Path.home())!r})",
            f"os.listdir({str(Path.home() / '.ssh')!r})",
            "os.listdir(os.path.expanduser('~/.ssh'))",
            "open(f'/proc/{os.getppid()}/environ').read()",
            f"open('/proc/{os.getpid()}/environ', 'rb').read().decode()",
            "dict(os.environ)",
        ]
        code = "import os\n" + "".join(
            f"try:\n    print({a})\nexcept Exception as e:\n    print(type(e).__name__)\n" for a in attempts
        )
        result = run(code)
    finally:
        import shutil

        shutil.rmtree(home)
    assert result.status == "passed"
    assert secret not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # ~ inside is the work directory; the host's processes are not even visible (own /proc).
    assert all(line in ("PermissionError", "FileNotFoundError") for line in lines[:3])
    assert lines[3:6] == ["FileNotFoundError"] * 3
    assert "MEMGEN_TEST_SECRET" not in lines[6]


def test_sockets_to_localhost_and_outside_fail(run):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = (
        "import socket\nfor target in [('127.0.0.1', %d), ('1.1.1.1', 53)]:\n"  # noqa: UP031 (the program text has its own braces)
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n        s.connect(target); print('connected')\n"
        "    except OSError as e:\n        print('refused', e.errno)\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    u.sendto(b'x', ('1.1.1.1', 53)); print('sent')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    ) % port
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
        code = (
            "import os, signal\n"
            f"for pid in [{victim.pid}, {os.getpid()}]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
        )
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


def test_signal_of_the_program_is_reported(run):
    result = run("import ctypes\nctypes.string_at(0)")
    assert result.status == "crashed" and result.signal == signal.SIGSEGV and "SIGSEGV" in result.detail


def test_missing_mechanism_is_refused_unless_weaker_isolation_is_allowed(monkeypatch):
    from memgen.tasks.sandbox import SandboxError

    # A minimal root that cannot be built (a top-level link that is not there) leaves the host's
    # root, and with it every host socket: the sandbox must say so and refuse.
    spec = Sandbox._spec
    monkeypatch.setattr(Sandbox, "_spec", lambda self, *a: {**spec(self, *a), "root_links": ["/no-such-link"]})
    with pytest.raises(SandboxError, match="unix_sockets: none: host root"):
        Sandbox(SandboxConfig(timeout=4))
    weaker = Sandbox(SandboxConfig(timeout=4, allow_weaker=True))
    assert weaker.mechanisms["unix_sockets"].startswith("none") and weaker.mechanisms["network"].startswith("network")
    assert "no-such-link" in weaker.mechanisms["unix_sockets"]
    assert weaker.run(Program({}, ["-c", "print('ran')"])).stdout == "ran\n"


@pytest.mark.slow
def test_cli_sandbox_info_names_every_mechanism():
    done = subprocess.run(
        [sys.executable, "-m", "memgen", "sandbox", "info"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    import json

    assert set(json.loads(done.stdout)) >= {
        "network",
        "unix_sockets",
        "filesystem",
        "uid",
        "signals",
        "processes",
        "cleanup",
        "proc",
    }


# ---------------------------------------------------------------- host sockets, root-only files, the uid

_UNIX_CLIENT = """import socket, errno
for path in {paths!r}:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect(path); s.sendall(b'escaped')
            else:
                s.sendto(b'escaped', path)
            print('reached', path)
        except OSError as e:
            print('refused', errno.errorcode[e.errno])
# The program's own unix sockets still work (multiprocessing, asyncio and pytest use them).
a, b = socket.socketpair(); a.sendall(b'own'); print(b.recv(3).decode())
"""


def _unix_listeners(directory: Path):
    """A stream and a datagram listener on socket files in ``directory``; returns (paths, sockets)."""
    stream, datagram = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    paths = [str(directory / "stream.sock"), str(directory / "datagram.sock")]
    stream.bind(paths[0])
    stream.listen()
    datagram.bind(paths[1])
    for s in (stream, datagram):
        s.setblocking(False)
        os.chmod(s.getsockname(), 0o777)  # as docker.sock-like services allow their group or everyone
    return paths, (stream, datagram)


def _assert_nothing_received(listeners) -> None:
    stream, datagram = listeners
    with pytest.raises(BlockingIOError):
        stream.accept()
    with pytest.raises(BlockingIOError):
        datagram.recv(64)


@pytest.mark.parametrize("where", ["var_tmp", "run_tmp_root"])
def test_host_unix_sockets_receive_nothing(where, tmp_path):
    if where == "var_tmp":  # outside /tmp, as /run/docker.sock or a PostgreSQL socket would be
        directory = Path(tempfile.mkdtemp(prefix="memgen-sock-", dir="/var/tmp" if os.path.isdir("/var/tmp") else REPO))
        sandbox = Sandbox(SandboxConfig(timeout=4))
    else:  # beside the run's own temporary directory on the host
        directory = tmp_path
        sandbox = Sandbox(SandboxConfig(timeout=4, tmp_root=str(tmp_path)))
    directory.chmod(0o777)
    paths, listeners = _unix_listeners(directory)
    try:
        result = sandbox.run(Program({}, ["-c", _UNIX_CLIENT.format(paths=paths)]))
        assert result.status == "passed", result.stderr
        assert "reached" not in result.stdout and result.stdout.count("refused") == 4
        assert result.stdout.splitlines()[-1] == "own"
        _assert_nothing_received(listeners)
    finally:
        for s in listeners:
            s.close()
        if where == "var_tmp":
            shutil.rmtree(directory)


def test_root_only_files_cannot_be_read_and_the_program_is_not_root(run):
    # A root-only file planted where the program may read (its interpreter's installation):
    # only the file's mode can stop it, so this checks the uid, not the minimal root.
    # As an ordinary user a file of that user's own is readable by design: only /etc/shadow then.
    root = os.geteuid() == 0
    planted = Path(sys.prefix if root else "/etc") / f"memgen-root-only-{uuid.uuid4().hex}"
    secret = f"SECRET-{uuid.uuid4().hex}"
    if root:
        planted.write_text(secret)
        planted.chmod(0o600)
    try:
        code = (
            "import os\n"
            f"for path in ['/etc/shadow', {str(planted)!r}]:\n"
            "    try:\n        print(open(path).read())\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())\n"
            "print(*[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapPrm', 'CapEff', 'CapAmb'))])\n"
        )
        result = run(code)
    finally:
        planted.unlink(missing_ok=True)
    assert result.status == "passed", result.stderr
    lines = result.stdout.splitlines()
    assert secret not in result.stdout
    assert lines[0] in ("FileNotFoundError", "PermissionError")
    assert lines[1] == ("PermissionError" if root else "FileNotFoundError")
    uid, euid, gid, egid, *groups = lines[2].replace("[", "").replace("]", "").replace(",", "").split()
    assert "0" not in (uid, euid, gid, egid) and "0" not in groups
    if root:
        assert groups == [] and int(uid) != os.geteuid()
    assert [int(caps, 16) for caps in lines[3].split()] == [0, 0, 0]  # no capabilities, not even ambient


# The fork bomb as an ordinary user: a helper run as root drops to nobody in a mount namespace
# of its own, where the ancestors of the interpreter and of this repository that deny
# "others" (a 0700 /root holding pyenv, say) are opened up by a tmpfs holding binds of their
# entries. That only makes the installation reachable for the uid; memgen then runs as
# nobody, with no capabilities, exactly as it would for a user who installed it.
_AS_NOBODY = r"""
import ctypes, json, os, stat, sys, tempfile
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC, MS_PRIVATE = 4096, 1 << 14, 1 << 18
def mount(src, dst, fstype, flags, data=None):
    if libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                  data and data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {src} {dst}")
assert libc.unshare(0x00020000) == 0
mount(None, "/", None, MS_REC | MS_PRIVATE)
def open_up(directory):
    stash = tempfile.mkdtemp()
    mount(directory, stash, None, MS_BIND | MS_REC)
    mount("tmpfs", directory, "tmpfs", 0, "mode=0755")
    for name in os.listdir(stash):
        src, dst = os.path.join(stash, name), os.path.join(directory, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst); continue
        os.mkdir(dst) if os.path.isdir(src) else open(dst, "w").close()
        mount(src, dst, None, MS_BIND | MS_REC)
probe = sys.argv[1]
for needed in sys.argv[2:]:
    parts = os.path.realpath(needed).split("/")
    for depth in range(2, len(parts) + 1):
        directory = "/".join(parts[:depth])
        if os.path.isdir(directory) and not os.stat(directory).st_mode & stat.S_IXOTH:
            open_up(directory)
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
from memgen.tasks.sandbox import Program, Sandbox, SandboxConfig
sandbox = Sandbox(SandboxConfig(timeout=4, processes=32))
bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
result = sandbox.run(Program({}, ["-c", bomb]))
probed = sandbox.run(Program({}, ["-c", probe]))
print(json.dumps({"uid": os.getuid(), "mechanisms": sandbox.mechanisms, "status": result.status,
                  "probe": probed.stdout, "probe_status": probed.status}))
"""


@pytest.mark.slow
def test_contained_when_memgen_is_not_root(tmp_path):
    """As an ordinary user (nobody): a fork bomb is contained without any cgroup, and host sockets,
    root-only files and host processes stay out of reach."""
    if os.geteuid() != 0:  # already an ordinary user: the module's other tests are this case
        pytest.skip("runs as an ordinary user already")
    directory = Path(tempfile.mkdtemp(prefix="memgen-sock-", dir="/var/tmp" if os.path.isdir("/var/tmp") else REPO))
    directory.chmod(0o777)
    paths, listeners = _unix_listeners(directory)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    probe = _UNIX_CLIENT.format(paths=paths) + (
        "import os, signal\n"
        "try:\n    open('/etc/shadow').read(); print('read shadow')\nexcept OSError as e:\n    print(type(e).__name__)\n"
        f"try:\n    os.kill({victim.pid}, signal.SIGKILL); print('killed')\nexcept OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    needed = [sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix, str(REPO)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY, probe, *needed],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout.splitlines()[-1])
        _assert_nothing_received(listeners)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
        for s in listeners:
            s.close()
        shutil.rmtree(directory)
    assert report["uid"] == 65534 and report["status"] == "timeout"
    assert report["mechanisms"]["processes"].startswith("RLIMIT_NPROC")
    assert report["mechanisms"]["uid"].startswith("uid 65534")
    assert not any(v.startswith("none") for v in report["mechanisms"].values())
    assert report["probe_status"] == "passed"
    lines = report["probe"].splitlines()
    assert "reached" not in report["probe"] and lines.count("refused ENOENT") == 4 and "own" in lines
    assert lines[-2] in ("FileNotFoundError", "PermissionError") and lines[-1] in (
        "ProcessLookupError",
        "PermissionError",
    )
    assert subprocess.run(["true"]).returncode == 0


def test_an_installation_under_tmp_stays_visible_read_only(tmp_path):
    """A virtualenv or interpreter under /tmp (a CI checkout there) is bound inside the private /tmp.

    The private /tmp is mounted before the read-only binds, so a bound path below /tmp is not
    hidden by it; this binds a directory under the host's /tmp as the interpreter's own would be.
    """
    installed = Path(tempfile.mkdtemp(prefix="memgen-installed-", dir="/tmp"))
    try:
        (installed / "module.py").write_text("VALUE = 42\n")
        installed.chmod(0o755)
        (installed / "module.py").chmod(0o644)
        sandbox = Sandbox(SandboxConfig(timeout=4))
        sandbox._layout = {
            **sandbox._layout,
            "binds": sandbox._layout["binds"] + [str(installed)],
            "read_paths": sandbox._layout["read_paths"] + [str(installed)],
        }
        # The run must still be inside its minimal root (a failed build falls back to the host's).
        code = (
            "import os; print(os.path.exists('/etc/shadow'), os.getuid() == 0)\n"
            f"import sys; sys.path.insert(0, {str(installed)!r}); import module; print(module.VALUE)\n"
            f"try:\n    open({str(installed / 'module.py')!r}, 'a').write('x')\nexcept OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        result = sandbox.run(Program({}, ["-c", code]))
        assert result.status == "passed", result.stderr
        assert result.stdout.split()[:3] == ["False", "False", "42"]
        assert result.stdout.split()[3] in ("OSError", "PermissionError")
        assert (installed / "module.py").read_text() == "VALUE = 42\n"
    finally:
        shutil.rmtree(installed)
