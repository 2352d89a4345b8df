"""Process-level limits for a model worker, applied once its model is loaded.

The language-level sandbox (``sandbox.py``) decides what trace code may *name*. This module
decides what the worker process may *do*, so that code which got past that layer still cannot
read or write files, reach the network, start programs or outlive its limits. Each layer is
best effort (a kernel without Landlock, a server not running as root); :func:`apply` returns
which ones are active, and the server lists them in ``GET /models``.

Layers, in the order they are applied:

1. **Environment**: variables outside a short allowlist (tokens, key-file paths) are removed.
2. **rlimits**: no core dumps; address space capped at the size after loading plus the job
   memory limit (skipped once CUDA is initialised, whose reservations would trip it); CPU time
   is set per job by :func:`set_cpu_budget`.
3. **Network namespace** (root only): ``unshare(CLONE_NEWNET)`` leaves the worker a network
   with no interfaces.
4. **Privileges** (root only): the worker becomes ``nobody`` when the Python installation is
   readable by it (so later lazy imports still work); otherwise it stays uid 0 but drops every
   capability, so file permissions bind it like any user.
5. **Parent death and ptrace**: the worker is killed if the server dies, and cannot be
   ptraced or dumped by other workers.
6. **Landlock** (Linux 5.13+): the kernel refuses any file access except reading the Python
   installation and the imported packages' folders, every TCP bind/connect (ABI 4+), and
   signals or abstract sockets outside the worker (ABI 6+). This also covers file access from
   native code (``torch.from_file``, ``ndarray.tofile``), which no Python hook sees.
7. **Audit hook** (``sys.addaudithook``, which cannot be removed): refuses the events of file
   writes and reads outside the library folders, sockets, subprocesses, ``os.system``, exec,
   fork, kill, ctypes, mmap, pickle, ``gc`` object walks, new audit hooks, and new threads on
   Pythons that audit thread starts (a thread started anyway inherits Landlock and every
   process-wide layer).
   Frame and code introspection events (``sys._getframe``, ``object.__getattr__`` on
   ``gi_frame``/``tb_frame``, ``code.__new__``...) are refused when the trace's own code
   triggers them; the engine and libraries keep using them.

The worker's connection to the server is an inherited pipe, which none of these layers close.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import stat
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policy import SandboxViolation

__all__ = [
    "LockdownReport",
    "apply",
    "child_started",
    "library_roots",
    "set_cpu_budget",
    "set_user_files",
    "trusted",
]

NOBODY = 65534

_ENV_KEEP_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "TORCH_", "PYTORCH_", "NVIDIA_", "CUDA_")
_ENV_KEEP = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "TOKENIZERS_PARALLELISM",
        "PYTHONHASHSEED",
    }
)


@dataclass
class LockdownReport:
    """Which layers are active in this worker, and why the others are not."""

    active: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, list[str]]:
        return {"active": list(self.active), "skipped": list(self.skipped)}


def library_roots(protected: Iterable[Path] = ()) -> list[Path]:
    """Folders the worker may still read: the Python installation and imported packages' folders.

    A folder that contains a ``protected`` path (the server's data folder, the key file) is left
    out, so a package installed next to the data cannot expose it.
    """
    protected = [Path(p).resolve() for p in protected]
    candidates: set[Path] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        candidates.add(Path(prefix).resolve())
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or "." in name:
            continue
        location = Path(path).resolve()
        candidates.add(location.parent if location.name == "__init__.py" else location)
    roots: list[Path] = []
    for candidate in sorted(candidates, key=lambda p: len(p.parts)):
        if not candidate.exists():
            continue
        if any(candidate == root or root in candidate.parents for root in roots):
            continue
        if any(candidate == p or candidate in p.parents for p in protected):
            continue
        roots.append(candidate)
    return roots


# ----- per-job knobs ---------------------------------------------------------------------------
_user_files: frozenset[str] = frozenset()


def set_user_files(filenames: Iterable[str]) -> None:
    """Tell the audit hook which code is the trace's own (by its code objects' file names)."""
    global _user_files
    _user_files = frozenset(filenames)


def set_cpu_budget(seconds: float) -> None:
    """Let the process use ``seconds`` more CPU time; past that the kernel stops it (SIGXCPU)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    soft = int(used + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# ----- applying -----------------------------------------------------------------------------
def apply(
    *,
    memory_bytes: int | None,
    protected: Iterable[Path] = (),
    network: bool = True,
    privileges: bool = True,
    landlock: bool = True,
    audit: bool = True,
) -> LockdownReport:
    """Apply every layer that works here; irreversible for this process."""
    report = LockdownReport()
    protected = list(protected)
    roots = library_roots(protected)
    _scrub_environment()
    report.active.append("environment scrubbed")
    sys.dont_write_bytecode = True
    _rlimits(memory_bytes, report)
    if network:
        _network_namespace(report)
    if privileges:
        _drop_privileges(roots, report)
    _parent_death_and_ptrace(report)
    if landlock:
        _landlock(roots, report)
    if audit:
        install_audit_hook(roots)
        report.active.append("audit hook")
    return report


def _scrub_environment() -> None:
    for name in list(os.environ):
        if name not in _ENV_KEEP and not name.startswith(_ENV_KEEP_PREFIXES):
            del os.environ[name]


def _rlimits(memory_bytes: int | None, report: LockdownReport) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes is None:
        return
    cuda = sys.modules.get("torch.cuda")
    if cuda is not None and cuda.is_initialized():
        report.skipped.append("address-space limit (CUDA reserves address space; the RSS watchdog applies)")
        return
    size = _vm_size()
    if size is None:
        report.skipped.append("address-space limit (/proc/self/status unreadable)")
        return
    limit = size + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report.active.append(f"address space <= {limit // 2**20} MiB")


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _network_namespace(report: LockdownReport) -> None:
    if os.geteuid() != 0:
        report.skipped.append("network namespace (needs root)")
        return
    libc = _libc()
    if libc.unshare(0x40000000) != 0:
        report.skipped.append(f"network namespace (unshare: {os.strerror(ctypes.get_errno())})")
        return
    report.active.append("network namespace (no interfaces)")


def _readable_by_others(path: Path) -> bool:
    try:
        for part in [path, *path.parents]:
            mode = part.stat().st_mode
            if part != path and not mode & stat.S_IXOTH:
                return False
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _drop_privileges(roots: list[Path], report: LockdownReport) -> None:
    if os.geteuid() != 0:
        report.active.append(f"unprivileged (uid {os.geteuid()})")
        return
    if all(_readable_by_others(root) for root in roots):
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        report.active.append("runs as nobody")
        return
    libc = _libc()
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)
    libc.prctl(47, 4, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        report.skipped.append(f"capability drop (capset: {os.strerror(ctypes.get_errno())})")
        return
    unreadable = next(str(r) for r in roots if not _readable_by_others(r))
    report.active.append(f"root without capabilities (stays uid 0: {unreadable} is not readable by nobody)")


def _parent_death_and_ptrace(report: LockdownReport) -> None:
    libc = _libc()
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    libc.prctl(4, 0, 0, 0, 0)
    report.active.append("dies with the server; not ptrace-able")


def child_started(parent: int) -> None:
    """In a process just forked from a locked-down one: die with ``parent``, as the parent dies with the server.

    Everything else (Landlock, namespaces, privileges, rlimits, the audit hook) carries over a
    fork; the parent-death signal does not. Call it inside :func:`trusted`.
    """
    _libc().prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


# ----- Landlock --------------------------------------------------------------------------------
_LANDLOCK_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when unavailable)."""
    numbers = _LANDLOCK_SYSCALLS.get(platform.machine())
    if numbers is None:
        return 0
    version = _libc().syscall(numbers[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def _landlock(roots: list[Path], report: LockdownReport) -> None:
    abi = landlock_abi()
    if abi < 1:
        report.skipped.append("Landlock (not supported by this kernel)")
        return
    create, add_rule, restrict = _LANDLOCK_SYSCALLS[platform.machine()]
    libc = _libc()
    fs = (1 << 13) - 1
    if abi >= 2:
        fs |= 1 << 13
    if abi >= 3:
        fs |= 1 << 14
    if abi >= 5:
        fs |= 1 << 15
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        report.skipped.append(f"Landlock (create: {os.strerror(ctypes.get_errno())})")
        return
    try:
        paths = [*roots, Path("/dev/null"), Path("/dev/urandom")]
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                access = _READ_FILE | (_READ_DIR if path.is_dir() else 0)
                rule = _PathBeneath(access, fd)
                if libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    report.skipped.append(f"Landlock rule for {path} ({os.strerror(ctypes.get_errno())})")
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:
            report.skipped.append(f"Landlock (no_new_privs: {os.strerror(ctypes.get_errno())})")
            return
        if libc.syscall(restrict, ruleset, ctypes.c_uint32(0)) != 0:
            report.skipped.append(f"Landlock (restrict: {os.strerror(ctypes.get_errno())})")
            return
    finally:
        os.close(ruleset)
    extras = []
    if abi >= 4:
        extras.append("no TCP")
    if abi >= 6:
        extras.append("no signals or abstract sockets outside")
    report.active.append(f"Landlock ABI {abi} (read-only library folders{', ' if extras else ''}{', '.join(extras)})")


# ----- the audit hook ------------------------------------------------------------------------------
_BLOCK = "block"
_USER = "user"
_PATH = "path"

_POLICY: dict[str, str] = {
    "open": _PATH,
    "os.listdir": _PATH,
    "os.scandir": _PATH,
    "glob.glob": _PATH,
    "glob.glob/2": _PATH,
    "sys._getframe": _USER,
    "sys._getframemodulename": _USER,
    "sys.settrace": _USER,
    "sys.setprofile": _USER,
    "object.__getattr__": _USER,
    "object.__setattr__": _USER,
    "object.__delattr__": _USER,
    "code.__new__": _USER,
    "function.__new__": _USER,
    "resource.setrlimit": _USER,
    "resource.prlimit": _USER,
    "sys.addaudithook": _BLOCK,
    "sys._current_frames": _BLOCK,
    "sys._current_exceptions": _BLOCK,
    "gc.get_objects": _BLOCK,
    "gc.get_referrers": _BLOCK,
    "gc.get_referents": _BLOCK,
    "builtins.input": _BLOCK,
    "builtins.breakpoint": _BLOCK,
    "pickle.find_class": _BLOCK,
    "subprocess.Popen": _BLOCK,
    "os.system": _BLOCK,
    "os.exec": _BLOCK,
    "os.posix_spawn": _BLOCK,
    "os.spawn": _BLOCK,
    "os.fork": _BLOCK,
    "os.forkpty": _BLOCK,
    "os.kill": _BLOCK,
    "os.killpg": _BLOCK,
    "os.startfile": _BLOCK,
    "os.putenv": _BLOCK,
    "os.unsetenv": _BLOCK,
    "os.chdir": _BLOCK,
    "os.chmod": _BLOCK,
    "os.chown": _BLOCK,
    "os.chflags": _BLOCK,
    "os.link": _BLOCK,
    "os.symlink": _BLOCK,
    "os.mkdir": _BLOCK,
    "os.mkfifo": _BLOCK,
    "os.mknod": _BLOCK,
    "os.remove": _BLOCK,
    "os.rename": _BLOCK,
    "os.rmdir": _BLOCK,
    "os.truncate": _BLOCK,
    "os.utime": _BLOCK,
    "os.setxattr": _BLOCK,
    "os.removexattr": _BLOCK,
    "os.lockf": _BLOCK,
    "signal.pthread_kill": _BLOCK,
    "mmap.__new__": _BLOCK,
    "_thread.start_new_thread": _BLOCK,
    "webbrowser.open": _BLOCK,
    "urllib.Request": _BLOCK,
    "pty.spawn": _BLOCK,
    "syslog.openlog": _BLOCK,
    "syslog.syslog": _BLOCK,
}
_BLOCK_PREFIXES = (
    "socket.",
    "ctypes.",
    "shutil.",
    "tempfile.",
    "http.client.",
    "ftplib.",
    "smtplib.",
    "imaplib.",
    "poplib.",
    "nntplib.",
    "telnetlib.",
    "sqlite3.",
    "fcntl.",
    "msvcrt.",
    "winreg.",
    "_winapi.",
    "os.posix_spawn",
    "os.exec",
    "os.spawn",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_EXCL", 0)

_hook_state = threading.local()
_readable: tuple[str, ...] = ()
_readable_files = frozenset({"/dev/null", "/dev/urandom"})


def install_audit_hook(roots: Iterable[Path]) -> None:
    """Install the worker's audit hook (permanent for this process)."""
    global _readable
    _readable = tuple(str(r) for r in roots)
    sys.addaudithook(_audit)


def _refuse(event: str, detail: str) -> None:
    raise SandboxViolation(f"{detail} is not allowed on this server (refused by its audit hook: {event})")


class trusted:
    """A section of the worker's own code that the audit hook lets through: forking a job process
    and starting its threads, which it refuses to everything else.

    The flag is per thread and lives in this module, which trace code cannot import or reach.
    """

    def __enter__(self) -> None:
        _hook_state.trusted = True

    def __exit__(self, *exc: object) -> None:
        _hook_state.trusted = False


def _audit(event: str, args: tuple) -> None:
    if getattr(_hook_state, "trusted", False):
        return
    policy = _POLICY.get(event)
    if policy is None:
        if event.startswith(_BLOCK_PREFIXES):
            _refuse(event, _describe(event))
        return
    if getattr(_hook_state, "busy", False):
        return
    _hook_state.busy = True
    try:
        if policy == _BLOCK:
            _refuse(event, _describe(event))
        caller = sys._getframe(1)
        user = caller is not None and _is_user_code(caller.f_code.co_filename)
        if policy == _USER:
            if user:
                what = f"{event} {args[1]!r}" if event.startswith("object.") and len(args) > 1 else event
                _refuse(event, f"introspection ({what})")
            return
        _check_path(event, args, user)
    finally:
        _hook_state.busy = False


def _is_user_code(filename: str) -> bool:
    return filename in _user_files or filename.startswith("<function ")


def _check_path(event: str, args: tuple, user: bool) -> None:
    path = args[0] if args else None
    if isinstance(path, int):
        if user:
            _refuse(event, "opening a file descriptor")
        return
    if event == "open":
        mode = args[1] if len(args) > 1 else None
        flags = args[2] if len(args) > 2 else 0
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        ):
            _refuse(event, f"writing the file {path!r}")
    if path is None:
        path = "."
    try:
        resolved = os.path.realpath(os.fsdecode(os.fspath(path)))
    except (TypeError, ValueError):
        _refuse(event, f"accessing {path!r}")
        return
    if resolved in _readable_files:
        return
    for root in _readable:
        if resolved == root or resolved.startswith(root + os.sep):
            return
    _refuse(event, f"reading {resolved!r}")


def _describe(event: str) -> str:
    if event.startswith("socket.") or event.startswith(("http.", "urllib", "ftplib", "smtplib")):
        return "network access"
    if event in ("subprocess.Popen", "os.system", "pty.spawn") or event.startswith(
        ("os.exec", "os.spawn", "os.posix_spawn")
    ):
        return "starting programs"
    if event in ("os.fork", "os.forkpty", "_thread.start_new_thread"):
        return "starting processes or threads"
    if event in ("os.kill", "os.killpg", "signal.pthread_kill"):
        return "sending signals"
    if event.startswith("ctypes."):
        return "calling native code through ctypes"
    if event.startswith("gc.") or event in ("sys._current_frames", "sys._current_exceptions"):
        return "walking the interpreter's objects"
    if event == "pickle.find_class":
        return "unpickling"
    return f"this operation ({event})"
