"""Run untrusted Python programs (model completions) in an operating-system sandbox.

    r = run_code(source, stdin="", timeout_s=5.0, memory_mb=1024, max_output_bytes=1_000_000)
    r.status      "ok" | "runtime_error" | "timeout" | "memory_limit" | "output_limit" | "sandbox_error"
    r.stdout, r.stderr, r.exit_code, r.wall_s, r.memory_mechanism, r.peak_memory_mb
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
- a memory (and pids) cgroup of its own: ``memory_mb`` bounds all of the program's processes together, scratch
  files included (tmpfs pages are charged to the group), without swap, and ``max_processes`` bounds its tasks.
  cgroup v2 where this process's own cgroup (or ``$FASTRFT_SANDBOX_CGROUP``) delegates the memory controller, else
  v1 where its memory hierarchy is mounted writable (root, as in most containers). The sandbox's init is put in the
  group while it waits on bubblewrap's ``--block-fd``, before it forks the program, so nothing of the program is
  ever outside. Where no group can be created (an unprivileged user without delegation), the fallback still
  bounds the total: each process gets RLIMIT_AS = memory_mb / max_processes, and RLIMIT_NPROC caps the processes,
  so together they stay within memory_mb; a warning says so once. ``SandboxResult.memory_mechanism`` says which ran.
- rlimits set inside the sandbox by a few lines of Python before the program runs (soft = hard, so the program
  cannot raise them): RLIMIT_AS (only in the fallback above), RLIMIT_CPU (the time limit rounded up, plus one
  second), RLIMIT_NPROC (max_processes; counted per user namespace, so concurrent sandboxes do not share it),
  RLIMIT_FSIZE (the scratch size), RLIMIT_NOFILE, RLIMIT_CORE = 0.

A status is the sandbox's own observation, never the program's words: ``memory_limit`` means the kernel killed a
process of the program's group for memory (its OOM count) and the program failed; ``timeout`` means the program
was still running at the time limit. A program that stops or traces the sandbox's init cannot stall its own end:
once the program itself has exited, its exit status is reported (its output complete) and the sandbox torn down.
In the rlimit fallback the kernel keeps no count of refused allocations, so there ``memory_limit`` is inferred
from how the program died (a crash signal, or a MemoryError ending its traceback).

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

import itertools
import json
import math
import numbers
import operator
import os
import select
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
    if soft >= 0:  # -1: not set (RLIMIT_AS under a cgroup)
        resource.setrlimit(limit, (soft, hard))
sys.argv = [script]
del resource, limit, soft, hard, as_bytes, cpu_s, nproc, fsize, nofile
runpy.run_path(script, run_name="__main__")
"""

MEMORY_MECHANISMS = ("cgroup2", "cgroup1", "rlimit")
CGROUP_ENV = "FASTRFT_SANDBOX_CGROUP"  # a delegated cgroup directory to create the programs' groups in
MIN_PROCESS_MB = 32                    # RLIMIT_AS a Python process needs to start (its VmPeak is ~14 MB)
MIN_OPEN_FILES = 4                     # file descriptors Python needs to start a program (stdio and main.py)
MAX_TIMEOUT_S = 1e6                    # about 11 days: past what the clocks' waits take
# The rlimit fallback's inference (no kernel count there): allocation failures surface as MemoryError, or as a
# crash (SIGSEGV/SIGABRT/SIGBUS) when the failing allocation is in C code that cannot raise.
_MEMORY_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}
STALL_CHECK_S = 0.1  # how often a quiet sandbox is checked for a program that ended under a stopped init


@dataclass
class SandboxResult:
    status: str              # one of STATUSES
    stdout: str              # decoded as UTF-8 (invalid bytes replaced), at most max_output_bytes
    stderr: str
    exit_code: int | None    # the program's exit status; 128 + n when killed by signal n; None when it never ended
    wall_s: float            # from start to the sandbox being gone
    memory_mechanism: str = "rlimit"   # what bounded memory_mb: one of MEMORY_MECHANISMS
    peak_memory_mb: float | None = None  # the program group's peak memory, all processes together (cgroups only)


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int
    max_processes: int
    scratch_mb: int
    max_open_files: int

    def launcher_args(self, mechanism: str) -> list[str]:
        cpu_s = max(1, math.ceil(self.timeout_s)) + 1  # a backstop: the wall clock normally ends it first
        # A cgroup bounds the processes together; without one each gets its share of the budget.
        as_bytes = -1 if mechanism != "rlimit" else (self.memory_mb << 20) // self.max_processes
        return [str(as_bytes), str(cpu_s), str(self.max_processes), str(self.scratch_mb << 20),
                str(self.max_open_files)]


def _python() -> str:
    """The interpreter programs run in: the system's python3 (readable by ``nobody``, under /usr) when there is
    one, else the trainer's own."""
    for candidate in ("/usr/bin/python3", os.path.realpath(getattr(sys, "_base_executable", sys.executable))):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("fastrft.sandbox: no Python interpreter found to run programs with")


def _bwrap_command(python: str, limits: _Limits, mechanism: str, source_fd: int, status_fd: int,
                   block_fd: int | None) -> list[str]:
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
            "--remount-ro", "/", "--chdir", SCRATCH_DIR, "--json-status-fd", str(status_fd)]
    if block_fd is not None:  # the sandbox's init waits here, before it forks the program, until it is in its group
        cmd += ["--block-fd", str(block_fd)]
    cmd += ["--", python, "-I", "-c", LAUNCHER, f"{SCRATCH_DIR}/main.py", *limits.launcher_args(mechanism)]
    return cmd


def _memfd(name: str, data: bytes) -> int:
    """An in-memory file holding ``data``, positioned at its start, to hand to the child as a file descriptor."""
    fd = os.memfd_create(name, 0)  # no MFD_CLOEXEC: pass_fds / stdin hand it on
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), None once the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (absent, or a zombie awaiting its reaper)."""
    fields = _proc_stat(pid)
    return fields is None or fields[0] == b"Z"


def _exited_program(sandbox_pid: int) -> tuple[bool, int | None]:
    """(whether the program, the child of the sandbox's init, has exited while the init lives on, its exit status
    as waitpid reports it when the kernel still holds it). An init that is stopped or traced (the program stopped
    it) never reaps the program nor ends the sandbox, so the run would otherwise last until the time limit."""
    init = _proc_stat(sandbox_pid)
    if init is None or init[0] not in (b"T", b"t"):
        return False, None
    try:
        with open(f"/proc/{sandbox_pid}/task/{sandbox_pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        return False, None
    program = _proc_stat(children[0]) if children else None
    if children and program is not None and program[0] != b"Z":
        return False, None
    # Field 52 of stat (exit_code, Linux 3.5+), 50th after the command name; absent once reaped.
    return True, (int(program[49]) if program is not None and len(program) > 49 else None)


# ---------------------------------------------------------------------------------------------------------------
# The program's cgroup: memory_mb and max_processes over all its processes together


def _read_counter(path: str, key: str) -> int:
    """The value of ``key`` in a cgroup's flat-keyed file (``memory.events``, ``memory.oom_control``); 0 when
    absent."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _write_control(directory: str, name: str, value, optional: bool = False):
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(f"{value}\n")
    except FileNotFoundError:
        if not optional:
            raise


class _ProgramGroup:
    """One program's cgroup (v2), or its memory and pids cgroups (v1): created with its limits before the program
    starts, read when it has ended, removed after."""

    def __init__(self, mechanism: str, parents: dict[str, str], limits: _Limits):
        self.mechanism = mechanism
        self.dirs: list[str] = []
        name = f"fastrft-sandbox-{os.getpid()}-{next(_group_numbers)}"
        memory_bytes = limits.memory_mb << 20
        try:
            if mechanism == "cgroup2":
                self.memory_dir = self._make(parents["cgroup2"], name)
                _write_control(self.memory_dir, "memory.max", memory_bytes)
                _write_control(self.memory_dir, "memory.swap.max", 0, optional=True)
                _write_control(self.memory_dir, "memory.oom.group", 1, optional=True)  # kill the program whole
                _write_control(self.memory_dir, "pids.max", limits.max_processes, optional=True)
            else:
                self.memory_dir = self._make(parents["memory"], name)
                _write_control(self.memory_dir, "memory.limit_in_bytes", memory_bytes)
                # no swap either, where swap is accounted (memsw can only be set at or above the memory limit)
                _write_control(self.memory_dir, "memory.memsw.limit_in_bytes", memory_bytes, optional=True)
                if "pids" in parents:
                    _write_control(self._make(parents["pids"], name), "pids.max", limits.max_processes)
        except OSError:
            self.remove()
            raise

    def _make(self, parent: str, name: str) -> str:
        directory = os.path.join(parent, name)
        os.mkdir(directory)
        self.dirs.append(directory)
        if self.mechanism == "cgroup2":
            with open(os.path.join(directory, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    raise OSError(f"the memory controller is not delegated to {parent}")
        return directory

    def admit(self, pid: int):
        for directory in self.dirs:
            _write_control(directory, "cgroup.procs", pid)

    def oom_kills(self) -> int:
        """How many of the program's processes the kernel killed for memory."""
        if self.mechanism == "cgroup2":
            return _read_counter(os.path.join(self.memory_dir, "memory.events"), "oom_kill")
        return _read_counter(os.path.join(self.memory_dir, "memory.oom_control"), "oom_kill")

    def peak_mb(self) -> float | None:
        name = "memory.peak" if self.mechanism == "cgroup2" else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.memory_dir, name)) as f:
                return int(f.read()) / (1 << 20)
        except (OSError, ValueError):
            return None

    def remove(self):
        for directory in reversed(self.dirs):
            give_up = time.monotonic() + 2.0
            while True:  # the last task leaves its group a moment after it is reaped
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > give_up:
                        warnings.warn(f"fastrft.sandbox: cannot remove the cgroup {directory}", RuntimeWarning)
                        break
                    time.sleep(0.005)
        self.dirs = []


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup directory in each mounted hierarchy that matters here: "cgroup2", "memory", "pids"."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else ["cgroup2"]:
                paths[controller] = path
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            root, mount_point, fstype, options = fields[3], fields[4], fields[dash + 1], fields[dash + 3]
            if fstype == "cgroup2":
                keys = ["cgroup2"]
            elif fstype == "cgroup":
                keys = [option for option in options.split(",") if option in ("memory", "pids")]
            else:
                continue
            for key in keys:
                path = paths.get(key)
                if key in found or path is None or not (root == "/" or path == root or path.startswith(root + "/")):
                    continue
                inside = path if root == "/" else path[len(root):]
                found[key] = os.path.join(mount_point, inside.lstrip("/"))
    return found


def _cgroup_candidates() -> list[tuple[str, dict[str, str]]]:
    """(mechanism, parent directories) to try, best first: $FASTRFT_SANDBOX_CGROUP alone when set."""
    chosen = os.environ.get(CGROUP_ENV)
    if chosen:
        if os.path.isfile(os.path.join(chosen, "cgroup.controllers")):
            return [("cgroup2", {"cgroup2": chosen})]
        if os.path.isfile(os.path.join(chosen, "memory.limit_in_bytes")):
            return [("cgroup1", {"memory": chosen})]
        raise RuntimeError(f"fastrft.sandbox: {CGROUP_ENV}={chosen} is neither a cgroup v2 directory nor a v1 "
                           "memory cgroup directory")
    own = _own_cgroups()
    candidates = []
    if "cgroup2" in own:
        candidates.append(("cgroup2", {"cgroup2": own["cgroup2"]}))
    if "memory" in own:
        candidates.append(("cgroup1", {key: own[key] for key in ("memory", "pids") if key in own}))
        if "pids" in own:
            candidates.append(("cgroup1", {"memory": own["memory"]}))
    return candidates


_group_numbers = itertools.count()
_memory_lock = threading.Lock()
_memory_place: tuple[str, dict[str, str], str] | None = None  # (mechanism, parents, why no cgroup), found once
_rlimit_warned = False


def memory_mechanism() -> str:
    """How ``memory_mb`` is enforced here: "cgroup2", "cgroup1", or "rlimit" (the fallback). Found once, by
    creating and removing a trial group."""
    return _find_memory_place()[0]


def _find_memory_place() -> tuple[str, dict[str, str], str]:
    global _memory_place
    with _memory_lock:
        if _memory_place is None:
            problems = []
            try:
                candidates = _cgroup_candidates()
            except OSError as e:
                candidates, problems = [], [f"cannot read this process's cgroups ({e})"]
            for mechanism, parents in candidates:
                try:
                    _ProgramGroup(mechanism, parents, _Limits(1.0, 64, 0, 8, 1, 8)).remove()
                except OSError as e:
                    problems.append(f"{mechanism} in {', '.join(parents.values())}: {e}")
                    continue
                _memory_place = (mechanism, parents, "")
                break
            else:
                if os.environ.get(CGROUP_ENV):
                    raise RuntimeError(f"fastrft.sandbox: cannot create a cgroup in {CGROUP_ENV}="
                                       f"{os.environ[CGROUP_ENV]}: {'; '.join(problems)}")
                _memory_place = ("rlimit", {}, "; ".join(problems) or "no cgroup hierarchy is mounted")
        return _memory_place


def _new_group(limits: _Limits) -> _ProgramGroup | None:
    """The program's cgroup, or None in the rlimit fallback."""
    mechanism, parents, _ = _find_memory_place()
    return None if mechanism == "rlimit" else _ProgramGroup(mechanism, parents, limits)


class _Run:
    """One program: spawn, pump the pipes until it ends or a limit passes, tear the sandbox down."""

    def __init__(self, cmd: list[str], limits: _Limits, stdin_fd: int, pass_fds: tuple[int, ...],
                 status_r: int | None, cwd: str | None, as_nobody: bool):
        self.limits = limits
        self.status_r = status_r
        self.status_buffer = bytearray()
        self.sandbox_pid: int | None = None  # host pid of the sandbox's init (its pid namespace's pid 1)
        self.exit_code_reported: int | None = None
        self.stalled_returncode: int | None = None  # the program's, when it ended but its sandbox's init did not
        extra = {"user": NOBODY_UID, "group": NOBODY_GID, "extra_groups": []} if as_nobody else {}
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=pass_fds, cwd=cwd, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                     start_new_session=True, **extra)

    def _take_status(self, chunk: bytes):
        # bubblewrap writes one JSON object per line: {"child-pid": ...} at start, {"exit-code": ...} at the end.
        self.status_buffer += chunk
        *lines, rest = bytes(self.status_buffer).split(b"\n")
        self.status_buffer = bytearray(rest)
        for line in lines:
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

    def enter_group(self, group: _ProgramGroup, block_w: int) -> str | None:
        """Put the sandbox's init, which waits on the block fd before it forks the program, into the program's
        cgroup, then let it go on. On failure the sandbox is killed before the gate opens: a program never runs
        outside its group. Returns the problem, or None."""
        problem = None
        try:
            give_up = time.monotonic() + max(self.limits.timeout_s, 10.0)
            while self.sandbox_pid is None and problem is None:
                ready = select.select([self.status_r], [], [], max(0.0, give_up - time.monotonic()))[0]
                chunk = os.read(self.status_r, 65536) if ready else None
                if chunk is None:
                    problem = "bubblewrap did not report its sandbox's pid"
                elif not chunk:  # bubblewrap ended during set-up: its stderr says why (a sandbox_error)
                    return None
                else:
                    self._take_status(chunk)
            if problem is None:
                group.admit(self.sandbox_pid)
                os.write(block_w, b"1")
        except OSError as e:
            problem = f"cannot put the program in its cgroup: {e}"
        finally:
            if problem is not None:
                if self.sandbox_pid is not None:
                    _kill(self.sandbox_pid)
                _killpg(self.proc.pid)
            os.close(block_w)
        return problem

    def pump(self) -> tuple[bytes, bytes, str | None]:
        """(stdout, stderr, the limit that ended the run, "stalled", or None)."""
        cap = self.limits.max_output_bytes
        buffers = {self.proc.stdout.fileno(): bytearray(), self.proc.stderr.fileno(): bytearray()}
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
                if remaining_s <= 0 and limit_hit is None:
                    limit_hit = "timeout"
                    break
                if limit_hit == "stalled":
                    wait_s = 0.0  # the program has ended: take what its pipes still hold, then stop
                elif self.sandbox_pid is not None:
                    wait_s = min(remaining_s, STALL_CHECK_S)
                else:
                    wait_s = remaining_s
                events = selector.select(timeout=wait_s)
                if not events:
                    if limit_hit == "stalled":
                        break
                    if self.sandbox_pid is not None:
                        exited, wait_status = _exited_program(self.sandbox_pid)
                        if exited:
                            limit_hit = "stalled"
                            self.stalled_returncode = _returncode(wait_status)
                    continue
                for key, _ in events:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        open_fds -= 1
                    elif key.fd == self.status_r:
                        self._take_status(chunk)
                    else:
                        buffers[key.fd] += chunk
                        if len(buffers[key.fd]) > cap:
                            limit_hit = "output_limit"
                if limit_hit == "output_limit":
                    break
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
        if limit_hit == "stalled":
            return self.stalled_returncode, None
        return (None if limit_hit else self.proc.returncode), limit_hit


def _returncode(wait_status: int | None) -> int | None:
    """A waitpid status as Popen reports it: the exit status, or -n when killed by signal n."""
    if wait_status is None:
        return None
    return -(wait_status & 0x7F) if wait_status & 0x7F else wait_status >> 8


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


def _classify(returncode: int | None, limit_hit: str | None, stderr: bytes, started: bool,
              oom_kills: int | None) -> tuple[str, int | None]:
    """The status from what the sandbox saw: ``oom_kills`` is the kernel's count for the program's cgroup (None in
    the rlimit fallback, where the way the program died is all there is to go on)."""
    if limit_hit is not None:
        return limit_hit, None
    if not started or returncode is None:
        return "sandbox_error", returncode
    exit_code = 128 - returncode if returncode < 0 else returncode  # killed by signal -> 128 + n, as a shell says
    if exit_code == 0:
        return "ok", 0
    signal_number = exit_code - 128 if exit_code > 128 else None
    if signal_number == signal.SIGXCPU:  # RLIMIT_CPU: a backstop, the wall clock normally ends a run first
        return "timeout", exit_code
    if oom_kills is None:
        last_line = stderr.rstrip().rsplit(b"\n", 1)[-1]
        out_of_memory = signal_number in _MEMORY_SIGNALS or last_line.startswith(b"MemoryError")
    else:
        out_of_memory = oom_kills > 0
    return ("memory_limit" if out_of_memory else "runtime_error"), exit_code


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
    start = time.monotonic()
    python = _python()
    source_bytes, stdin_bytes = source.encode(), stdin.encode()   # (run_code has checked that they encode)
    try:
        group = _new_group(limits)
    except OSError as e:
        return SandboxResult("sandbox_error", "", f"cannot create the program's cgroup: {e}", None,
                             time.monotonic() - start, memory_mechanism())
    mechanism = group.mechanism if group else "rlimit"
    source_fd = _memfd("main.py", source_bytes)
    stdin_fd = _memfd("stdin", stdin_bytes)
    status_r, status_w = os.pipe()
    block_r, block_w = os.pipe() if group else (None, None)
    child_fds = [source_fd, stdin_fd, status_w] + ([block_r] if group else [])
    try:
        try:
            run = _Run(_bwrap_command(python, limits, mechanism, source_fd, status_w, block_r), limits, stdin_fd,
                       tuple(fd for fd in child_fds if fd != stdin_fd), status_r, cwd="/", as_nobody=_as_nobody())
        except OSError as e:
            if group:
                os.close(block_w)
            return SandboxResult("sandbox_error", "", f"cannot start bwrap: {e}", None, time.monotonic() - start,
                                 mechanism)
        finally:
            for fd in child_fds:  # the child holds its copies
                os.close(fd)
        try:
            problem = run.enter_group(group, block_w) if group else None
            if problem is None:
                out, err, limit_hit = run.pump()
            else:
                out, err, limit_hit = b"", problem.encode(), "sandbox_error"
        except BaseException:   # (an interrupt too) nothing the program started is left running
            run.finish("interrupted")
            raise
        returncode, limit_hit = run.finish(limit_hit)
        if run.exit_code_reported is not None and limit_hit is None and run.stalled_returncode is None:
            returncode = run.exit_code_reported
        oom_kills = group.oom_kills() if group else None
        peak_mb = group.peak_mb() if group else None
    finally:
        os.close(status_r)
        if group:
            group.remove()
    status, exit_code = _classify(returncode, limit_hit, err, run.sandbox_pid is not None, oom_kills)
    if status == "sandbox_error" and not err:
        err = b"bubblewrap did not start the program"
    return SandboxResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), exit_code,
                         time.monotonic() - start, mechanism, peak_mb)


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
        cmd = [_python(), "-I", "-c", LAUNCHER, script, *limits.launcher_args("rlimit")]
        try:
            run = _Run(cmd, limits, stdin_fd, (), None, cwd=scratch, as_nobody=False)
        finally:
            os.close(stdin_fd)
        try:
            out, err, limit_hit = run.pump()
        except BaseException:
            run.finish("interrupted")
            raise
        returncode, limit_hit = run.finish(limit_hit)
    status, exit_code = _classify(returncode, limit_hit, err, True, None)
    return SandboxResult(status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), exit_code,
                         time.monotonic() - start, "rlimit")


def _check_limits(timeout_s, memory_mb, max_output_bytes, max_processes, scratch_mb, max_open_files) -> _Limits:
    """The limits, each checked by name: a bad one would otherwise surface as a wall of failed programs that read
    as zero rewards."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not math.isfinite(timeout_s) \
            or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"run_code: timeout_s must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:g}, got "
                         f"{timeout_s!r}")
    counts = {}
    for name, value, least in (("memory_mb", memory_mb, 1), ("max_output_bytes", max_output_bytes, 0),
                               ("max_processes", max_processes, 2), ("scratch_mb", scratch_mb, 1),
                               ("max_open_files", max_open_files, MIN_OPEN_FILES)):
        try:
            counts[name] = operator.index(value)
        except TypeError:
            raise ValueError(f"run_code: {name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or counts[name] < least:
            raise ValueError(f"run_code: {name} must be an integer >= {least}, got {value!r}")
    return _Limits(float(timeout_s), **counts)


def run_code(source: str, stdin: str = "", *, timeout_s: float = 5.0, memory_mb: int = 1024,
             max_output_bytes: int = 1_000_000, max_processes: int = 32, scratch_mb: int = 64,
             max_open_files: int = 64, unsafe: bool = False) -> SandboxResult:
    """Run the Python program ``source`` with ``stdin`` in a fresh sandbox; see the module docstring.

    ``memory_mb`` bounds the program's processes together; ``max_processes`` counts every process and thread of
    the program (and the sandbox's init). ``scratch_mb`` caps the writable /tmp and /dev/shm, and any one file.
    Raises ValueError for a bad argument, RuntimeError when no sandbox can be started here, unless
    ``unsafe=True``.
    """
    global _rlimit_warned
    if not isinstance(source, str):
        raise ValueError(f"run_code: source must be str, got {type(source).__name__} (decode bytes first)")
    if not isinstance(stdin, str):
        raise ValueError(f"run_code: stdin must be str (\"\" for none), got {type(stdin).__name__}")
    for name, text in (("source", source), ("stdin", stdin)):
        try:
            text.encode()
        except UnicodeEncodeError as e:   # a lone surrogate, as JSON's "\ud800" loads
            raise ValueError(f"run_code: {name} is not valid Unicode: {e.object[e.start:e.end]!r} at index "
                             f"{e.start} ({e.reason}) cannot be written as UTF-8") from None
    limits = _check_limits(timeout_s, memory_mb, max_output_bytes, max_processes, scratch_mb, max_open_files)
    isolated = sandbox_available()
    if not isolated and not unsafe:
        raise RuntimeError(f"fastrft.sandbox: cannot isolate programs here ({_bwrap_problem}); {INSTALL_HINT}, or "
                           "pass unsafe=True to run them with rlimits only, without isolation")
    if not isolated or memory_mechanism() == "rlimit":
        if memory_mb // max_processes < MIN_PROCESS_MB:
            raise ValueError(f"run_code: without a memory cgroup each process gets memory_mb / max_processes = "
                             f"{memory_mb} // {max_processes} = {memory_mb // max_processes} MB, less than the "
                             f"{MIN_PROCESS_MB} MB a Python process needs: raise memory_mb or lower max_processes")
        if isolated and not _rlimit_warned:
            _rlimit_warned = True
            warnings.warn(f"fastrft.sandbox: no memory cgroup can be created here ({_find_memory_place()[2]}); "
                          "memory_mb bounds a program's processes together by giving each memory_mb / "
                          f"max_processes of address space (RLIMIT_AS). Run as root, or point {CGROUP_ENV} at a "
                          "cgroup delegated to you, for a bound on the program's total memory", RuntimeWarning,
                          stacklevel=2)
    return _run_bwrap(source, stdin, limits) if isolated else _run_unsafe(source, stdin, limits)


def run_many(jobs: Iterable[str | tuple[str, str]], workers: int = 8, **limits) -> list[SandboxResult]:
    """``run_code`` over many programs from a pool of ``workers`` threads; each job is a source or a
    (source, stdin) pair. Results come back in the jobs' order."""
    pairs = []
    for index, job in enumerate(jobs):
        pair = (job, "") if isinstance(job, str) else job
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"run_many: job {index} must be a source str or a (source, stdin) pair of str, got "
                             f"{type(job).__name__}")
        pairs.append(tuple(pair))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"run_many: workers must be an integer >= 1, got {workers!r}")
    if not pairs:
        return []
    if not limits.get("unsafe") and not sandbox_available():  # raise once, here, rather than in every worker
        run_code("", **limits)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as pool:
        return list(pool.map(lambda pair: run_code(pair[0], pair[1], **limits), pairs))
