"""Sandbox launcher: confines itself with kernel mechanisms, then execs the untrusted program.

Run by :mod:`memgen.tasks.sandbox` as ``python -I -S confine.py`` with a ``marshal``-ed spec
on stdin. It uses only the standard library (``-S``: no site-packages) and never runs inside
the host process, so ``fork`` never happens in a multi-threaded trainer. Start-up time is
overhead on every execution, so it imports nothing it can do without: ``json`` and
``signal`` (their ``re``/``enum`` imports) cost about 15 ms here, ``marshal`` nothing.

Order, in a fresh single-threaded process:

1. (the host has already put this process into the run's pids cgroup, if it made one: for
   root the only process-count limit, as uid 0 ignores RLIMIT_NPROC);
2. ``unshare`` a network, PID and mount namespace (plus a user namespace when not root);
3. fork: the child is PID 1 of the new namespace, so when it dies the kernel kills every
   process the program started, even those that left the process group. The launcher
   waits for it and reports its host PID;
4. in the child: size-limited private tmpfs mounts on ``/tmp`` (holding the work
   directory), ``/dev/shm`` (and the work directory itself when it lies outside ``/tmp``),
   a ``/proc`` showing only the namespace's processes, the program's files written into
   it, rlimits, ``no_new_privs``, a Landlock domain (read-only allowlist, writes only in
   the private mounts, no TCP, no signals or abstract sockets outside the sandbox), then
   ``execve`` with the given environment.

Every step that the platform refuses is skipped and named in the report (written as JSON
lines to the report fd), so the host always knows which mechanisms were in force.
"""

import ctypes
import marshal
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIGKILL = 9
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446

# Landlock filesystem rights, by the ABI version that introduced them.
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def _landlock(abi: int, read_paths: list, write_paths: list, write_files: list) -> str:
    """Build and enforce the Landlock domain; returns a description of what it covers."""
    handled = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) \
        | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                       SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                            ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(f"landlock_create_ruleset: {_errno_text()}")
    rules = [(p, FS_READ) for p in read_paths] + [(p, handled) for p in write_paths] \
        + [(p, FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)) for p in write_files]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # an allowlisted path that does not exist here
        try:
            if not os.path.isdir(path):
                access &= FILE_RIGHTS
            rule = PathBeneathAttr(access & handled, fd)
            if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                             ctypes.c_uint32(0)) < 0:
                raise OSError(f"landlock_add_rule {path}: {_errno_text()}")
        finally:
            os.close(fd)
    if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        raise OSError(f"landlock_restrict_self: {_errno_text()}")
    os.close(ruleset)
    covered = ["filesystem"] + (["tcp"] if abi >= 4 else []) \
        + (["signals", "abstract-unix-sockets"] if abi >= 6 else [])
    return f"landlock abi {abi}: " + ", ".join(covered)


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _namespaces(report: dict) -> tuple[bool, bool, bool]:
    """Enter new namespaces; returns (network, pid, mount) isolation in force."""
    uid, gid = os.getuid(), os.getgid()
    user = 0 if uid == 0 else CLONE_NEWUSER
    for flags in (CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS, CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNET):
        if _unshare(flags | user):
            break
    else:
        report["namespaces"] = f"unshare refused: {_errno_text()}"
        return False, False, False
    if user:  # map ourselves to root inside, so we may mount (not a privilege outside the namespace)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    return True, bool(flags & CLONE_NEWPID), bool(flags & CLONE_NEWNS)


def _mount_tmpfs(target: str, size: int) -> bool:
    options = f"size={size},mode=0700".encode()
    return _libc.mount(b"tmpfs", target.encode(), b"tmpfs", ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                       ctypes.c_char_p(options)) == 0


def _child(spec: dict, report: dict, mount_ns: bool, pid_ns: bool, report_fd: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    workdir = spec["workdir"]
    writable = [workdir]
    if mount_ns and _libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) == 0:
        # A private /tmp (tests often write to absolute /tmp paths) holding the work directory
        # when it lives there; both vanish with the mount namespace.
        size = spec["tmpfs_bytes"]
        if _mount_tmpfs("/tmp", size):
            writable = ["/tmp"]
            report["tmp"] = "private tmpfs"
        inside_tmp = os.path.realpath(workdir).startswith("/tmp/")
        if inside_tmp and writable == ["/tmp"]:
            os.makedirs(workdir, mode=0o700)
            report["workdir"] = f"in a private /tmp tmpfs of {size} bytes"
        elif _mount_tmpfs(workdir, size):
            writable.append(workdir)
            report["workdir"] = f"private tmpfs of {size} bytes"
        else:
            report["workdir"] = f"host temporary directory (tmpfs refused: {_errno_text()})"
        if os.path.isdir("/dev/shm") and _mount_tmpfs("/dev/shm", min(size, 64 << 20)):
            writable.append("/dev/shm")
        # A /proc of the new PID namespace: the program sees only its own processes, and
        # tools that read /proc/<pid> (psutil) find the right ones.
        if pid_ns and _libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC),
                                  None) == 0:
            report["proc"] = "private"
    else:
        report["workdir"] = "host temporary directory"
    for name, text in spec["files"].items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write(path, text)
    os.chdir(workdir)

    limits = spec["limits"]
    for name, value in (("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_AS", limits["address_space"]),
                        ("RLIMIT_FSIZE", limits["file_size"]), ("RLIMIT_NPROC", limits["processes"]),
                        ("RLIMIT_NOFILE", limits["open_files"]), ("RLIMIT_CORE", 0)):
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(getattr(resource, name), (value, hard))
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    abi = landlock_abi()
    if report.get("tmp"):
        spec["env"]["TMPDIR"] = "/tmp"
    if abi:
        try:
            report["landlock"] = _landlock(abi, spec["read_paths"], writable, ["/dev/null"])
        except OSError as exc:
            report["landlock"] = f"failed: {exc}"
    else:
        report["landlock"] = "unavailable"
    _report(report_fd, report)
    os.close(report_fd)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _report(fd: int, entries: dict) -> None:
    """One ``key<TAB>value`` line per entry on the report pipe."""
    os.write(fd, "".join(f"{k}\t{v}\n" for k, v in entries.items()).encode())


def main() -> None:
    spec = marshal.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    report_fd = spec["report_fd"]
    report: dict = {}
    network, pid_ns, mount_ns = _namespaces(report)
    report["network"] = "namespace" if network else "shared"
    report["pid_namespace"] = pid_ns
    pid = os.fork()
    if pid == 0:
        try:
            _child(spec, report, mount_ns, pid_ns, report_fd)
        except BaseException as exc:  # the host must see why the program never started
            os.write(2, f"memgen sandbox: cannot start the program: {exc!r}\n".encode())
        os._exit(126)
    _report(report_fd, {"init_pid": pid})
    _, status = os.waitpid(pid, 0)
    # With a PID namespace, the wait returns once every process in it is gone.
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    _report(report_fd, {"signal": signum})
    os._exit(128 + signum if signum else os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
