"""Sandbox launcher: confines itself with kernel mechanisms, then execs the untrusted program.

Run by :mod:`memgen.tasks.sandbox` as ``python -I -S confine.py`` with a ``marshal``-ed spec
on stdin. It uses only the standard library (``-S``: no site-packages) and never runs inside
the host process, so ``fork`` never happens in a multi-threaded trainer. Start-up time is
overhead on every execution, so it imports nothing it can do without: ``json`` and
``signal`` (their ``re``/``enum`` imports) cost about 15 ms here, ``marshal`` nothing.

Order, in a fresh single-threaded process:

1. ``unshare`` a network, PID and mount namespace; when memgen is not root, inside a new
   user namespace that maps the caller's own uid and gid to themselves (so the program
   keeps an ordinary uid inside, and the namespace's capabilities serve only the mounts);
2. fork: the child is PID 1 of the new namespace, so when it dies the kernel kills every
   process the program started, even those that left the process group. The launcher
   waits for it and reports its host PID;
3. in the child, a **minimal root** (as bubblewrap builds one): a small tmpfs holding
   read-only bind mounts of exactly what a test program reads (``/usr``, the interpreter
   and its ``sys.path``, a short list of ``/etc`` entries, five device nodes), a private
   ``/proc``, size-limited private tmpfs mounts on ``/tmp`` (holding the work directory)
   and ``/dev/shm``; then ``pivot_root`` into it and detach the host's root. A path to a
   host unix socket (``/run``, ``/var``, ``/home``, the host's ``/tmp``) names nothing
   inside, which is what closes pathname-socket ``connect`` (Landlock does not govern it);
4. as root, drop to the run's own unprivileged uid and gid (no supplementary groups), so
   file modes stop reads of root-only files and ``RLIMIT_NPROC`` binds again;
5. the program's files written into the work directory, rlimits, ``no_new_privs``, no
   ambient capabilities, a Landlock domain (read-only allowlist, writes only in the private
   mounts, no TCP, no signals or abstract sockets outside the sandbox), then ``execve``.

Every step that the platform refuses is skipped and named in the report (``key<TAB>value``
lines on the report fd), so the host always knows which mechanisms were in force.
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
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 1 << 14, 1 << 18, 1 << 21
MNT_DETACH = 2
# statvfs f_flag bits that a read-only remount inside a user namespace must keep (the kernel
# refuses to clear a flag it locked), as their mount(2) flags.
_KEPT_FLAGS = (
    (2, MS_NOSUID),
    (4, MS_NODEV),
    (8, MS_NOEXEC),
    (1024, MS_NOATIME),
    (2048, MS_NODIRATIME),
    (4096, MS_RELATIME),
)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 38, 47, 4
SIGKILL = 9
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}

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
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


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
    handled = (
        FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    )
    attr = RulesetAttr(
        handled,
        NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0,
    )
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(f"landlock_create_ruleset: {_errno_text()}")
    rules = (
        [(p, FS_READ) for p in read_paths]
        + [(p, handled) for p in write_paths]
        + [(p, FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)) for p in write_files]
    )
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # an allowlisted path that does not exist here
        try:
            if not os.path.isdir(path):
                access &= FILE_RIGHTS
            rule = PathBeneathAttr(access & handled, fd)
            if (
                _libc.syscall(
                    SYS_LANDLOCK_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(1),
                    ctypes.byref(rule),
                    ctypes.c_uint32(0),
                )
                < 0
            ):
                raise OSError(f"landlock_add_rule {path}: {_errno_text()}")
        finally:
            os.close(fd)
    if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        raise OSError(f"landlock_restrict_self: {_errno_text()}")
    os.close(ruleset)
    covered = (
        ["filesystem"] + (["tcp"] if abi >= 4 else []) + (["signals", "abstract-unix-sockets"] if abi >= 6 else [])
    )
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
    if user:  # the caller's own ids, unchanged inside: the namespace's capabilities allow the mounts only
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return True, bool(flags & CLONE_NEWPID), bool(flags & CLONE_NEWNS)


def _mount(source, target: str, fstype, flags: int, options: str | None = None) -> bool:
    return (
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            ctypes.c_char_p(options.encode()) if options else None,
        )
        == 0
    )


def _tmpfs(target: str, size: int, owner: tuple[int, int], mode: str = "0700") -> bool:
    return _mount(
        "tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode},uid={owner[0]},gid={owner[1]}"
    )


def _remount_read_only(target: str) -> bool:
    kept = os.statvfs(target).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
    for bit, flag in _KEPT_FLAGS:
        if kept & bit:
            flags |= flag
    return _mount(None, target, None, flags)


def _bind(source: str, root: str) -> None:
    """Bind ``source`` read-only at the same path under ``root``."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    if not _mount(source, target, None, MS_BIND | MS_REC):
        raise OSError(f"bind mount of {source}: {_errno_text()}")
    if not _remount_read_only(target):
        raise OSError(f"read-only remount of {source}: {_errno_text()}")


def _minimal_root(spec: dict, report: dict, owner: tuple[int, int], pid_ns: bool) -> list:
    """Build the program's root on a tmpfs at the work directory's host path and pivot into it.

    Returns the writable paths. Raises OSError when a step is refused; the caller then keeps
    the host's root (named in the report) and Landlock's allowlist alone confines reads.
    """
    root, workdir, size = spec["workdir"], spec["workdir"], spec["tmpfs_bytes"]
    if not _tmpfs(root, 1 << 20, (os.getuid(), os.getgid()), "0755"):
        raise OSError(f"tmpfs for the new root: {_errno_text()}")
    # The private /tmp first, the binds after: an interpreter or virtualenv that lives under
    # /tmp (a CI checkout there) must stay visible, read-only, inside the private /tmp.
    os.makedirs(root + "/tmp")
    if not _tmpfs(root + "/tmp", size, owner):
        raise OSError(f"tmpfs for /tmp: {_errno_text()}")
    for link in spec["root_links"]:
        os.symlink(os.readlink(link), root + link)
    for path in spec["binds"]:
        if os.path.lexists(path):
            _bind(path, root)
    os.makedirs(root + "/etc", exist_ok=True)
    # Who the program is, for getpass/pwd; the host's account list is not shown.
    _write(root + "/etc/passwd", f"root:x:0:0::/:/bin/sh\nsandbox:x:{owner[0]}:{owner[1]}::{workdir}:/bin/sh\n")
    _write(root + "/etc/group", f"root:x:0:\nsandbox:x:{owner[1]}:\n")
    os.makedirs(root + "/dev/shm")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{root}/dev/{name}")
    if not _tmpfs(root + "/dev/shm", min(size, 64 << 20), owner):
        raise OSError(f"tmpfs for /dev/shm: {_errno_text()}")
    os.makedirs(root + "/proc")
    # A /proc of the new PID namespace: the program sees only its own processes, and tools
    # that read /proc/<pid> (psutil) find the right ones.
    if pid_ns and _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        report["proc"] = "private"
    else:
        _bind("/proc", root)
    if os.path.realpath(workdir).startswith("/tmp/"):
        report["workdir"] = f"in a private /tmp tmpfs of {size} bytes"
    else:
        os.makedirs(root + workdir)
        if not _tmpfs(root + workdir, size, owner):
            raise OSError(f"tmpfs for the work directory: {_errno_text()}")
        report["workdir"] = f"private tmpfs of {size} bytes"
    os.chdir(root)
    if _libc.syscall(SYS_PIVOT_ROOT.get(os.uname().machine, -1), b".", b".") != 0:
        raise OSError(f"pivot_root: {_errno_text()}")
    if _libc.umount2(b".", MNT_DETACH) != 0:
        raise OSError(f"detaching the host's root: {_errno_text()}")
    os.chdir("/")
    if not _remount_read_only("/"):
        raise OSError(f"read-only remount of the new root: {_errno_text()}")
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    os.chown(workdir, *owner)
    report["root"] = "minimal"
    report["tmp"] = "private tmpfs"
    return ["/tmp", "/dev/shm", workdir]


def _reachable_by_others(path: str) -> bool:
    """Whether a uid that owns nothing on the host may traverse to and run ``path``."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for depth in range(1, len(parts)):
        if not os.stat("/".join(parts[:depth]) or "/").st_mode & 0o001:
            return False
    return os.stat(path).st_mode & 0o005 == 0o005


def _drop_to(owner: tuple[int, int]) -> None:
    """Become ``owner`` for good: no groups, no saved ids, no capabilities left."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(owner[1], owner[1], owner[1])
        os.setresuid(owner[0], owner[0], owner[0])
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _child(spec: dict, report: dict, mount_ns: bool, pid_ns: bool, report_fd: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    workdir = spec["workdir"]
    owner = (spec["uid"], spec["gid"]) if os.getuid() == 0 else (os.getuid(), os.getgid())
    writable = [workdir]
    if mount_ns and _mount(None, "/", None, MS_REC | MS_PRIVATE):
        try:
            writable = _minimal_root(spec, report, owner, pid_ns)
        except OSError as exc:
            report["root"] = f"host root ({exc})"
            _libc.umount2(workdir.encode(), MNT_DETACH)  # what was built of the new root
    else:
        report["root"] = "host root (no mount namespace)"
    if report.get("root") != "minimal":
        report["workdir"] = "host temporary directory"
        if os.getuid() == 0:
            if _reachable_by_others(spec["argv"][0]):
                os.chown(workdir, *owner)
            else:  # on the host's root an unprivileged uid could not even start the interpreter
                owner = (0, 0)
    _drop_to(owner)
    report["uid"] = f"{os.getuid()}:{os.getgid()}"
    for name, text in spec["files"].items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write(path, text)
    os.chdir(workdir)

    limits = spec["limits"]
    for name, value in (
        ("RLIMIT_CPU", limits["cpu_seconds"]),
        ("RLIMIT_AS", limits["address_space"]),
        ("RLIMIT_FSIZE", limits["file_size"]),
        ("RLIMIT_NPROC", limits["processes"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
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
