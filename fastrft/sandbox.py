"""Run untrusted Python programs (model completions) in an operating-system sandbox.

    r = run_code(source, stdin="", timeout_s=5.0, memory_mb=1024, max_output_bytes=1_000_000)
    r.status      "ok" | "runtime_error" | "timeout" | "memory_limit" | "output_limit" | "sandbox_error"
    r.stdout, r.stderr, r.exit_code, r.wall_s
    results = run_many([(source, stdin), ...], workers=8, timeout_s=...)   # a thread pool, results in order

Isolation is bubblewrap (``bwrap``), an unprivileged namespace sandbox; Python-level patching is no boundary, so
it is not used. Each program gets:

- new user, pid, network, ipc, uts and cgroup namespaces (``--unshare-all --unshare-user``), and it cannot create
  further user namespaces (``--disable-userns``). Only a down loopback exists: no connection goes anywhere.
- a filesystem of read-only system directories (``/usr`` and its ``/bin``, ``/lib*`` links, the dynamic loader's
  cache), a private ``/proc`` of its own pid namespace and a minimal read-only ``/dev``. The only writable places
  are ``/tmp`` (its scratch directory and working directory, which holds ``main.py``) and ``/dev/shm``: size-capped
  tmpfs mounts that vanish with the sandbox. Nothing of the host's home, project or data is mounted.
- an empty environment apart from PATH, HOME and LANG: bubblewrap itself is started with that environment too, so
  not even the sandbox's init process carries the trainer's variables.
- when the trainer runs as root, bubblewrap is started as ``nobody`` (65534): a process of the host's root user is
  exempt from RLIMIT_NPROC, and an unprivileged sandbox needs no privilege anyway.
- rlimits set inside the sandbox by a few lines of Python before the program runs (soft = hard, so the program
  cannot raise them): RLIMIT_AS (memory_mb), RLIMIT_CPU (the time limit rounded up, plus one second), RLIMIT_NPROC
  (max_processes; counted per user namespace, so concurrent sandboxes do not share it), RLIMIT_FSIZE (the scratch
  size), RLIMIT_NOFILE, RLIMIT_CORE = 0.

The wall-clock limit and the output caps are enforced here: stdout and stderr are read through pipes, and when the
time runs out or either stream passes ``max_output_bytes`` the sandbox's init process (its pid namespace's pid 1)
is killed, which makes the kernel kill every process in the namespace, daemons and fork storms included. The call
waits for the namespace to be empty before it returns, so nothing is left behind, and it never waits on the
program's children: bubblewrap's init exits as soon as the program itself does, taking the rest with it.

Where bubblewrap is missing or does not work (no user namespaces), ``run_code`` raises a RuntimeError that says
what to install, unless ``unsafe=True``: then the program runs with the rlimits only (no namespaces: it can read
files, see the network and escape with a daemon) and a warning says so once.
"""
from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

STATUSES = ("ok", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
SCRATCH_DIR = "/tmp"             # inside the sandbox
NOBODY_UID = NOBODY_GID = 65534  # what a root trainer drops to before starting bubblewrap
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap)"

# Runs inside the sandbox as `python -I -c LAUNCHER script as_bytes cpu_s nproc fsize_bytes nofile`: it lowers
# the rlimits (soft = hard) and runs the program as __main__ in the same interpreter, saving a second start-up.
LAUNCHER = """\
import resource, runpy, sys
script, as_bytes, cpu_s, nproc, fsize, nofile = sys.argv[1], *map(int, sys.argv[2:7])
for limit, soft, hard in ((resource.RLIMIT_AS, as_bytes, as_bytes), (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
                          (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
                          (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(limit, (soft, hard))
sys.argv = [script]
del resource, limit, soft, hard, as_bytes, cpu_s, nproc, fsize, nofile
runpy.run_path(script, run_name="__main__")
"""

# Signals that mean "out of memory" under RLIMIT_AS: allocation failures surface as MemoryError, or as a crash
# (SIGSEGV/SIGABRT) when the failing allocation is in C code that cannot raise.
_MEMORY_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}
_MEMORY_MESSAGES = ("MemoryError", "Cannot allocate memory", "out of memory")


@dataclass
class SandboxResult:
    status: str              # one of STATUSES
    stdout: str              # decoded as UTF-8 (invalid bytes replaced), at most max_output_bytes
    stderr: str
    exit_code: int | None    # the program's exit status; 128 + n when killed by signal n; None when it never ended
    wall_s: float            # from start to the sandbox being gone


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    max_processes: int
    scratch_mb: int
    max_open_files: int

    def launcher_args(self) -> list[str]:
        cpu_s = max(1, math.ceil(self.timeout_s)) + 1  # a backstop: the wall clock normally ends it first
        return [str(self.memory_mb << 20), str(cpu_s), str(self.max_processes), str(self.scratch_mb << 20),
                str(self.max_open_files)]


def _python() -> str:
    """The interpreter programs run in: the system's python3 (readable by ``nobody``, under /usr) when there is
    one, else the trainer's own."""
    for candidate in ("/usr/bin/python3", os.path.realpath(getattr(sys, "_base_executable", sys.executable))):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("fastrft.sandbox: no Python interpreter found to run programs with")


def _bwrap_command(python: str, limits: _Limits, source_fd: int, status_fd: int) -> list[str]:
    scratch_bytes = str(limits.scratch_mb << 20)
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SCRATCH_DIR,
           "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: recreate the link
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
            "--ro-bind-try", "/etc/localtime", "/etc/localtime"]
    prefix = os.path.dirname(os.path.dirname(python))  # an interpreter outside /usr: its own installation
    if not python.startswith("/usr/"):
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--size", scratch_bytes, "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
            "--size", scratch_bytes, "--perms", "1777", "--tmpfs", SCRATCH_DIR,
            "--perms", "0444", "--file", str(source_fd), f"{SCRATCH_DIR}/main.py",
            "--remount-ro", "/", "--chdir", SCRATCH_DIR, "--json-status-fd", str(status_fd),
            "--", python, "-I", "-c", LAUNCHER, f"{SCRATCH_DIR}/main.py", *limits.launcher_args()]
    return cmd


def _memfd(name: str, data: bytes) -> int:
    """An in-memory file holding ``data``, positioned at its start, to hand to the child as a file descriptor."""
    fd = os.memfd_create(name, 0)  # no MFD_CLOEXEC: pass_fds / stdin hand it on
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (absent, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


class _Run:
    """One program: spawn, pump the pipes until it ends or a limit passes, tear the sandbox down."""

    def __init__(self, cmd: list[str], limits: _Limits, stdin_fd: int, pass_fds: tuple[int, ...],
                 status_r: int | None, cwd: str | None, as_nobody: bool):
        self.limits = limits
        self.status_r = status_r
        self.sandbox_pid: int | None = None  # host pid of the sandbox's init (its pid namespace's pid 1)
        self.exit_code_reported: int | None = None
        extra = {"user": NOBODY_UID, "group": NOBODY_GID, "extra_groups": []} if as_nobody else {}
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=pass_fds, cwd=cwd, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                     start_new_session=True, **extra)

    def _read_status(self, data: bytes):
        # bubblewrap writes one JSON object per line: {"child-pid": ...} at start, {"exit-code": ...} at the end.
        for line in data.splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            # Only the first child-pid counts: bubblewrap writes it before the program starts (the program
            # cannot reach this pipe anyway; the tests check that).
            if "child-pid" in message and self.sandbox_pid is None:
                self.sandbox_pid = int(message["child-pid"])
            if "exit-code" in message:
                self.exit_code_reported = int(message["exit-code"])

    def pump(self) -> tuple[bytes, bytes, str | None]:
        """(stdout, stderr, the limit that ended the run or None)."""
        cap = self.limits.max_output_bytes
        buffers = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
        status_buffer = bytearray()
        deadline = self.start + self.limits.timeout_s
        limit_hit = None
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                selector.register(fd, selectors.EVENT_READ)
            if self.status_r is not None:
                selector.register(self.status_r, selectors.EVENT_READ)
            open_fds = len(selector.get_map())
            while open_fds:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    limit_hit = "timeout"
                    break
                for key, _ in selector.select(timeout=remaining_s):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        open_fds -= 1
                    elif key.fd == self.status_r:
                        status_buffer += chunk
                    else:
                        buffers[key.fd] += chunk
                        if len(buffers[key.fd]) > cap:
                            limit_hit = "output_limit"
                if limit_hit:
                    break
        self._read_status(bytes(status_buffer))
        out, err = (bytes(buffers[self.proc.stdout.fileno()][:cap]), bytes(buffers[self.proc.stderr.fileno()][:cap]))
        return out, err, limit_hit

    def finish(self, limit_hit: str | None) -> tuple[int | None, str | None]:
        """Kill what is left and wait until the sandbox is gone: (bubblewrap's or the program's exit status, the
        limit that ended the run or None)."""
        if limit_hit is None:
            remaining_s = self.start + self.limits.timeout_s - time.monotonic()
            try:  # the pipes closed: normally the program has ended, unless it closed them itself
                self.proc.wait(timeout=max(0.0, remaining_s))
            except subprocess.TimeoutExpired:
                limit_hit = "timeout"
        if self.proc.poll() is None:
            if self.sandbox_pid is not None:
                # Killing the namespace's pid 1 makes the kernel kill every process inside; bubblewrap's monitor
                # reaps it only after the namespace is empty, then exits.
                _kill(self.sandbox_pid)
            _killpg(self.proc.pid)
        self.proc.wait()
        # When the monitor was killed before it reaped pid 1, pid 1 may still be tearing the namespace down.
        if self.sandbox_pid is not None:
            give_up = time.monotonic() + 5.0
            while not _pid_gone(self.sandbox_pid) and time.monotonic() < give_up:
                time.sleep(0.002)
        _killpg(self.proc.pid)  # unsafe mode: background children left in the program's process group
        self.proc.stdout.close()
        self.proc.stderr.close()
        return (None if limit_hit else self.proc.returncode), limit_hit


def _kill(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int | None, limit_hit: str | None, stderr: bytes, started: bool) -> tuple[str, int | None]:
    if limit_hit is not None:
        return limit_hit, None
    if not started:
        return "sandbox_error", returncode
    if returncode is None:
        return "sandbox_error", None
    exit_code = 128 - returncode if returncode < 0 else returncode  # killed by signal -> 128 + n, as a shell says
    if exit_code == 0:
        return "ok", 0
    signal_number = exit_code - 128 if exit_code > 128 else None
    if signal_number == signal.SIGXCPU:  # RLIMIT_CPU: a backstop, the wall clock normally ends a run first
        return "timeout", exit_code
    if signal_number in _MEMORY_SIGNALS or any(m.encode() in stderr[-2000:] for m in _MEMORY_MESSAGES):
        return "memory_limit", exit_code
    return "runtime_error", exit_code


_check_lock = threading.Lock()
_bwrap_ok: bool | None = None
_bwrap_problem = ""
_unsafe_warned = False


def _as_nobody() -> bool:
    return os.geteuid() == 0


def _bwrap_has_options(*options: str) -> bool:
    try:
        usage = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return all(option in usage for option in options)


def sandbox_available() -> bool:
    """Whether bubblewrap is installed and can start a sandbox here (checked once, by running a trivial program)."""
    global _bwrap_ok, _bwrap_problem
    with _check_lock:
        if _bwrap_ok is None:
            if shutil.which("bwrap") is None:
                _bwrap_ok, _bwrap_problem = False, "bwrap is not on PATH"
            elif not _bwrap_has_options("--disable-userns", "--size", "--json-status-fd"):
                _bwrap_ok, _bwrap_problem = False, "bwrap is too old: bubblewrap 0.8 or later is needed"
            else:
                result = _run_bwrap("print('ok')", "", _Limits(10.0, 256, 1000, 8, 1, 32))
                _bwrap_ok = result.status == "ok" and result.stdout == "ok\n"
                _bwrap_problem = "" if _bwrap_ok else f"a trivial program failed ({result.status}): " \
                                                      f"{result.stderr.strip()[-500:]}"
        return _bwrap_ok


def _run_bwrap(source: str, stdin: str, limits: _Limits) -> SandboxResult:
    python = _python()
    source_fd = _memfd("main.py", source.encode())
    stdin_fd = _memfd("stdin", stdin.encode())
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        run = _Run(_bwrap_command(python, limits, source_fd, status_w), limits, stdin_fd,
                   (source_fd, status_w), status_r, cwd="/", as_nobody=_as_nobody())
    except OSError as e:
        for fd in (source_fd, stdin_fd, status_r, status_w):
            os.close(fd)
        return SandboxResult("sandbox_error", "", f"cannot start bwrap: {e}", None, time.monotonic() - start)
    for fd in (source_fd, stdin_fd, status_w):  # the child holds its copies
        os.close(fd)
    try:
        out, err, limit_hit = run.pump()
        returncode, limit_hit = run.finish(limit_hit)
    finally:
        os.close(status_r)
    if run.exit_code_reported is not None and limit_hit is None:
        returncode = run.exit_code_reported
    status, exit_code = _classify(returncode, limit_hit, err, started=run.sandbox_pid is not None)
    if status == "sandbox_error" and not err:
        err = b"bubblewrap did not start the program"
    return SandboxResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), exit_code,
                         time.monotonic() - start)


def _run_unsafe(source: str, stdin: str, limits: _Limits) -> SandboxResult:
    global _unsafe_warned
    if not _unsafe_warned:
        _unsafe_warned = True
        warnings.warn("fastrft.sandbox: unsafe=True runs programs WITHOUT isolation (rlimits only; files, network "
                      f"and daemons are not contained); {INSTALL_HINT} to sandbox them", RuntimeWarning, stacklevel=3)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastrft-unsafe-") as scratch:
        script = os.path.join(scratch, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(source)
        stdin_fd = _memfd("stdin", stdin.encode())
        cmd = [_python(), "-I", "-c", LAUNCHER, script, *limits.launcher_args()]
        try:
            run = _Run(cmd, limits, stdin_fd, (), None, cwd=scratch, as_nobody=False)
        finally:
            os.close(stdin_fd)
        out, err, limit_hit = run.pump()
        returncode, limit_hit = run.finish(limit_hit)
    status, exit_code = _classify(returncode, limit_hit, err, started=True)
    return SandboxResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), exit_code,
                         time.monotonic() - start)


def run_code(source: str, stdin: str = "", *, timeout_s: float = 5.0, memory_mb: int = 1024,
             max_output_bytes: int = 1_000_000, max_processes: int = 32, scratch_mb: int = 64,
             max_open_files: int = 64, unsafe: bool = False) -> SandboxResult:
    """Run the Python program ``source`` with ``stdin`` in a fresh sandbox; see the module docstring.

    ``max_processes`` counts every process and thread of the program (and the sandbox's init). ``scratch_mb`` caps
    the writable /tmp and /dev/shm, and any one file. Raises RuntimeError when no sandbox can be started here,
    unless ``unsafe=True``.
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes < 0 or max_processes < 2 or scratch_mb <= 0:
        raise ValueError(f"run_code: limits must be positive (timeout_s={timeout_s}, memory_mb={memory_mb}, "
                         f"max_output_bytes={max_output_bytes}, max_processes={max_processes} (>= 2), "
                         f"scratch_mb={scratch_mb})")
    limits = _Limits(float(timeout_s), int(memory_mb), int(max_output_bytes), int(max_processes), int(scratch_mb),
                     int(max_open_files))
    if sandbox_available():
        return _run_bwrap(source, stdin, limits)
    if unsafe:
        return _run_unsafe(source, stdin, limits)
    raise RuntimeError(f"fastrft.sandbox: cannot isolate programs here ({_bwrap_problem}); {INSTALL_HINT}, or pass "
                       "unsafe=True to run them with rlimits only, without isolation")


def run_many(jobs: Iterable[str | tuple[str, str]], workers: int = 8, **limits) -> list[SandboxResult]:
    """``run_code`` over many programs from a pool of ``workers`` threads; each job is a source or a
    (source, stdin) pair. Results come back in the jobs' order."""
    pairs = [(job, "") if isinstance(job, str) else tuple(job) for job in jobs]
    if not pairs:
        return []
    if not limits.get("unsafe") and not sandbox_available():  # raise once, here, rather than in every worker
        run_code("", **limits)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as pool:
        return list(pool.map(lambda pair: run_code(pair[0], pair[1], **limits), pairs))
