"""The sandbox: correct, failing and slow programs, and a hostile suite, one test per promise of fastrft.sandbox.

Every hostile program is contained by the sandbox's own limits (small ones here), and every call runs under a
hard wall-clock bound (``_bounded``), so a broken sandbox fails a test instead of hanging or flooding the machine.
"""
import os
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from fastrft import sandbox

pytestmark = pytest.mark.skipif(not sandbox.sandbox_available(),
                                reason="bubblewrap missing or not working: apt-get install bubblewrap")

SMALL = {"timeout_s": 2.0, "memory_mb": 256, "max_processes": 16}


def _bounded(limit_s, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing the test when it takes longer than ``limit_s``."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"call still running after {limit_s}s"
    if "error" in box:
        raise box["error"]
    box["elapsed_s"] = time.monotonic() - start
    return box["value"]


def run(source, stdin="", limit_s=None, **limits):
    options = {**SMALL, **limits}
    return _bounded(limit_s or options["timeout_s"] + 3.0, sandbox.run_code, source, stdin, **options)


def _host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line or name (``/proc/<pid>/comm``) contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for field in ("cmdline", "comm"):
            try:
                with open(f"/proc/{entry}/{field}", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
                        break
            except OSError:
                pass
    return found


# ---------------------------------------------------------------------------------------------------------------
# Correct, failing and slow programs


def test_ok_with_stdin():
    r = run("import sys\nn = int(sys.stdin.readline())\nprint(sum(map(int, sys.stdin.readline().split())) * n)",
            "3\n1 2 3\n")
    assert (r.status, r.stdout, r.exit_code) == ("ok", "18\n", 0)
    assert 0 < r.wall_s < 2.0


def test_main_guard_exit_and_large_stdin():
    source = "import sys\ndef main():\n    print(len(sys.stdin.read()))\n    exit(0)\nif __name__ == '__main__':\n    main()"
    r = run(source, "x" * 3_000_000)  # more than a pipe holds
    assert (r.status, r.stdout) == ("ok", "3000000\n")


def test_runtime_error_and_exit_code():
    r = run("print('before')\nraise ValueError('boom')")
    assert (r.status, r.exit_code, r.stdout) == ("runtime_error", 1, "before\n")
    assert "ValueError: boom" in r.stderr
    r = run("import sys; sys.exit(3)")
    assert (r.status, r.exit_code) == ("runtime_error", 3)
    r = run("def f(:\n  pass")
    assert r.status == "runtime_error" and "SyntaxError" in r.stderr


def test_slow_program_times_out_promptly():
    start = time.monotonic()
    r = run("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout_s=1.0)
    assert (r.status, r.exit_code, r.stdout) == ("timeout", None, "started\n")
    assert time.monotonic() - start < 2.0
    r = run("while True:\n    pass", timeout_s=1.0)
    assert r.status == "timeout" and r.wall_s < 2.0


# ---------------------------------------------------------------------------------------------------------------
# Hostile programs


def test_cannot_see_trainer_environment(monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("FASTRFT_SECRET", secret)
    source = """
import os
print(sorted(os.environ))
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            print(open(f'/proc/{pid}/environ', 'rb').read())
        except OSError as e:
            print('unreadable', pid, e)
"""
    r = run(source)
    assert r.status == "ok"
    assert secret not in r.stdout and "FASTRFT_SECRET" not in r.stdout
    assert r.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'PWD']"


def test_cannot_read_host_files(tmp_path):
    private = tmp_path / "private.txt"
    private.write_text("top secret")
    private.chmod(0o644)
    tmp_path.chmod(0o755)
    home = os.path.expanduser("~")
    targets = [str(private), os.path.abspath(__file__), "/etc/passwd", "/etc/hostname", f"{home}/.bashrc",
               f"{home}/.profile", "/work/main/README.md", "/proc/1/root/etc/passwd"]
    source = f"""
for path in {targets!r}:
    try:
        print('LEAKED', path, open(path).read(20))
    except OSError as e:
        print('denied', path, type(e).__name__)
import os
print('root', sorted(os.listdir('/')))
"""
    r = run(source)
    assert r.status == "ok", r.stderr
    assert "LEAKED" not in r.stdout
    assert r.stdout.count("denied") == len(targets)
    assert "'work'" not in r.stdout and "'root'" not in r.stdout and "'home'" not in r.stdout


def test_cannot_write_outside_scratch(tmp_path):
    tmp_path.chmod(0o777)  # writable by anyone on the host: only the sandbox stands in the way
    outside = tmp_path / "escaped.txt"
    targets = [str(outside), "/escaped", "/usr/escaped", "/etc/escaped", "/dev/escaped", "/proc/escaped",
               "/usr/bin/python3"]
    source = f"""
for path in {targets!r}:
    try:
        with open(path, 'a') as f:
            f.write('x')
        print('WROTE', path)
    except OSError as e:
        print('denied', path, type(e).__name__)
import os
with open('scratch.txt', 'w') as f:
    f.write('fine')
print('scratch', os.getcwd(), open('/tmp/scratch.txt').read())
"""
    r = run(source)
    assert r.status == "ok", r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("denied") == len(targets)
    assert "scratch /tmp fine" in r.stdout
    assert not outside.exists() and not os.path.exists("/escaped")
    # the scratch directory is fresh for every program
    r = run("import os\nprint(os.listdir('.'))")
    assert r.stdout == "['main.py']\n"


def test_scratch_space_and_file_size_are_capped():
    r = run("with open('big', 'wb') as f:\n    f.write(b'x' * (3 << 20))", scratch_mb=2)
    assert r.status == "runtime_error"
    assert "File too large" in r.stderr or "No space left" in r.stderr
    many = "for i in range(10):\n    open(f'/dev/shm/f{i}', 'wb').write(b'x' * (1 << 20))"
    r = run(many, scratch_mb=2)
    assert r.status == "runtime_error" and "No space left" in r.stderr


def test_no_network_even_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        source = f"""
import socket
for host in ('127.0.0.1', '10.255.255.1', '1.1.1.1'):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, {port}))
        print('CONNECTED', host)
    except OSError as e:
        print('refused', host, type(e).__name__)
"""
        r = run(source)
        assert r.status == "ok", r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 3
        with pytest.raises(socket.timeout):
            server.accept()


def test_daemons_and_background_children_do_not_survive():
    marker = f"fastrft-daemon-{uuid.uuid4().hex}"
    source = f"""
import os, subprocess, sys, time
# a plain background child, and a classic double-fork daemon in its own session
subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', '{marker}'])
    os._exit(0)
time.sleep(0.3)
print('parent done')
"""
    start = time.monotonic()
    r = run(source, timeout_s=5.0)
    assert r.status == "ok" and r.stdout == "parent done\n", r.stderr
    assert time.monotonic() - start < 3.0  # returned when the program ended, not when its children would
    assert _host_processes_with(marker) == []


def test_fork_bomb_is_contained():
    marker = f"fb{uuid.uuid4().hex[:13]}"  # a process name (comm) holds 15 characters
    source = f"""
import os, time
with open('/proc/self/comm', 'w') as f:  # inherited by every fork: the host can find them by name
    f.write('{marker}')
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""
    start = time.monotonic()
    r = _bounded(6.0, sandbox.run_code, source, timeout_s=1.5, memory_mb=128, max_processes=16)
    assert r.status == "timeout"
    assert time.monotonic() - start < 1.5 + 1.0
    assert _host_processes_with(marker) == []


def test_process_limit_really_bites():
    source = """
import os, time
children = 0
try:
    for _ in range(200):
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        children += 1
except OSError as e:
    print(children, e.errno)
"""
    r = run(source, max_processes=12)
    assert r.status == "ok", r.stderr
    children, errno_value = map(int, r.stdout.split())
    assert 0 < children < 12 and errno_value == 11  # EAGAIN
    assert r.wall_s < 2.0  # the sleeping children died with the program


def test_concurrent_sandboxes_do_not_share_the_process_limit():
    source = """
import os, time
children = 0
try:
    for _ in range(8):
        if os.fork() == 0:
            time.sleep(1)
            os._exit(0)
        children += 1
except OSError:
    pass
print(children)
"""
    results = _bounded(20.0, sandbox.run_many, [source] * 4, workers=4, **{**SMALL, "max_processes": 12})
    assert [r.stdout for r in results] == ["8\n"] * 4


@pytest.fixture(params=["cgroup", "rlimit"])
def memory_mechanism(request, monkeypatch):
    """Each memory test under the cgroup this machine gives (skipped without one) and under the rlimit fallback."""
    if request.param == "rlimit":
        monkeypatch.setattr(sandbox, "_memory_place", ("rlimit", {}, "forced by the test"))
        monkeypatch.setattr(sandbox, "_rlimit_warned", True)
    elif sandbox.memory_mechanism() == "rlimit":
        pytest.skip(f"no memory cgroup can be created here: {sandbox._find_memory_place()[2]}")
    return sandbox.memory_mechanism()


@pytest.fixture
def cgroup():
    """What only a cgroup can give: the kernel's own count and peak, and tmpfs pages charged to the program."""
    if sandbox.memory_mechanism() == "rlimit":
        pytest.skip(f"no memory cgroup can be created here: {sandbox._find_memory_place()[2]}")


def test_memory_limit(memory_mechanism):
    r = run("x = bytearray(1 << 30)\nprint('allocated')", memory_mb=256, max_processes=4)
    assert (r.status, r.memory_mechanism) == ("memory_limit", memory_mechanism) and "allocated" not in r.stdout
    r = run("chunks = []\nwhile True:\n    chunks.append(' ' * (1 << 20))", memory_mb=256, max_processes=4)
    assert r.status == "memory_limit"


FORKED_ALLOCATIONS = """
import os, time
children = []
for _ in range(20):
    try:
        pid = os.fork()
    except OSError:
        break  # the process limit
    if pid == 0:
        try:
            block = bytearray(200 << 20)  # written: every page resident
            time.sleep(1.5)
            os._exit(0)
        except MemoryError:
            os._exit(3)
    children.append(pid)
outcomes = [os.waitpid(pid, 0)[1] for pid in children]
print(len(children), sum(status == 0 for status in outcomes))
"""


def test_memory_bounds_all_the_programs_processes_together(memory_mechanism):
    # 20 children of 200 MB each under memory_mb=256: at most one of them can hold its block at a time.
    r = run(FORKED_ALLOCATIONS, timeout_s=8.0, memory_mb=256, max_processes=32 if memory_mechanism != "rlimit" else 4)
    assert r.status == "ok", r.stderr
    forked, held = map(int, r.stdout.split())
    assert held <= 1, r.stdout
    if memory_mechanism == "rlimit":  # each process gets memory_mb / max_processes of address space
        assert forked <= 3 and held == 0
    else:  # the kernel's own count: the group never held more than the budget
        assert forked == 20 and r.peak_memory_mb is not None and r.peak_memory_mb <= 256 + 1


def test_run_many_bounds_memory_by_workers(cgroup):
    jobs = ["x = bytearray(100 << 20)\nimport time; time.sleep(0.5)\nprint(len(x) >> 20)"] * 4
    results = _bounded(30.0, sandbox.run_many, jobs, workers=4, **{**SMALL, "memory_mb": 64})
    assert [r.status for r in results] == ["memory_limit"] * 4
    assert all(r.peak_memory_mb <= 64 + 1 for r in results)


def test_memory_status_is_observed_not_read_from_stderr(cgroup):
    r = run("import sys\nprint('MemoryError: out of memory', file=sys.stderr)\nraise MemoryError")
    assert (r.status, r.exit_code) == ("runtime_error", 1)
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert (r.status, r.exit_code) == ("runtime_error", 128 + 11)


def test_scratch_files_count_against_memory(cgroup):
    r = run("open('/tmp/big', 'wb').write(b'x' * (60 << 20))\nprint('written')", memory_mb=40, scratch_mb=64)
    assert r.status == "memory_limit" and "written" not in r.stdout


def test_a_program_that_stops_the_sandboxs_init_gets_its_own_status():
    # PTRACE_ATTACH stops pid 1, which then never reaps the program nor ends the sandbox.
    source = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
print('attached' if libc.ptrace(16, 1, None, None) == 0 else f'refused {ctypes.get_errno()}', flush=True)
time.sleep(0.2)
sys.exit(EXIT)
"""
    r = run(source.replace("EXIT", "0"), timeout_s=5.0)
    if not r.stdout.startswith("attached"):
        pytest.skip(f"ptrace is not allowed here: {r.stdout.strip()}")
    assert (r.status, r.exit_code, r.stdout) == ("ok", 0, "attached\n")
    assert r.wall_s < 2.0  # not the 5 s time limit
    r = run(source.replace("EXIT", "4"), timeout_s=5.0)
    assert (r.status, r.exit_code) == ("runtime_error", 4) and r.wall_s < 2.0
    r = run(source.replace("sys.exit(EXIT)", "time.sleep(60)"), timeout_s=1.0)  # still running: a timeout
    assert (r.status, r.exit_code) == ("timeout", None)


def test_output_limit():
    start = time.monotonic()
    r = run("while True:\n    print('spam' * 100)", max_output_bytes=100_000)
    assert r.status == "output_limit" and len(r.stdout) == 100_000
    assert time.monotonic() - start < 2.0
    r = run("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", max_output_bytes=100_000)
    assert r.status == "output_limit" and len(r.stderr) == 100_000


def test_limits_cannot_be_raised():
    source = """
import resource
for name in ('RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_CPU'):
    limit = getattr(resource, name)
    soft, hard = resource.getrlimit(limit)
    if hard == resource.RLIM_INFINITY:  # RLIMIT_AS under a cgroup: nothing to raise
        print(name, soft, hard)
        continue
    try:
        resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print('RAISED', name)
    except (ValueError, OSError):
        print(name, soft, hard)
"""
    r = run(source, timeout_s=2.0, memory_mb=256, max_processes=4)
    assert r.status == "ok" and "RAISED" not in r.stdout
    address_space = -1 if r.memory_mechanism != "rlimit" else (256 << 20) // 4  # a cgroup bounds the total
    assert r.stdout.splitlines() == [f"RLIMIT_AS {address_space} {address_space}", "RLIMIT_NPROC 4 4",
                                     "RLIMIT_CPU 3 4"]


def test_cannot_harm_the_caller():
    parent_pid = os.getppid()
    source = """
import os, signal
for pid in (os.getppid(), 1, -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print('no', pid, e.errno)
print('still here')
"""
    r = run(source)
    assert r.status in ("ok", "runtime_error")  # kill(-1) may take the program down with its own namespace
    os.kill(os.getpid(), 0)
    os.kill(parent_pid, 0)  # raises when the test's parent is gone
    # the sandbox cannot see or name host processes, the caller included
    r = run(f"import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\nos.kill({os.getpid()}, 9)")
    assert r.status == "runtime_error" and "ProcessLookupError" in r.stderr
    assert r.stdout.strip() in ("[1, 2]", "[1, 3]", "[1, 2, 3]")


def test_no_extra_file_descriptors():
    r = run("import os\nprint(sorted(os.listdir('/proc/self/fd')))")
    assert r.stdout == "['0', '1', '2', '3']\n"  # stdin, stdout, stderr and listdir's own


def test_run_many_in_order():
    jobs = [(f"print({i} * int(input()))", f"{i}\n") for i in range(12)] + ["raise SystemExit(2)"]
    results = _bounded(30.0, sandbox.run_many, jobs, workers=8, **SMALL)
    assert [r.stdout for r in results[:12]] == [f"{i * i}\n" for i in range(12)]
    assert all(r.status == "ok" for r in results[:12])
    assert (results[12].status, results[12].exit_code) == ("runtime_error", 2)


def test_refuses_without_isolation_unless_unsafe(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_bwrap_ok", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    assert not sandbox.sandbox_available()
    with pytest.raises(RuntimeError, match=r"apt-get install bubblewrap"):
        sandbox.run_code("print(1)")
    with pytest.raises(RuntimeError, match=r"unsafe=True"):
        sandbox.run_many(["print(1)"])
    monkeypatch.setattr(sandbox, "_unsafe_warned", False)
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        r = _bounded(10.0, sandbox.run_code, "import sys\nprint(sys.stdin.read()[::-1])", "abc", unsafe=True)
    assert (r.status, r.stdout) == ("ok", "cba\n")
    r = _bounded(10.0, sandbox.run_code, "import time\ntime.sleep(30)", timeout_s=0.5, unsafe=True)
    assert r.status == "timeout"


@pytest.mark.parametrize("arguments, named", [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
    ({"timeout_s": float("inf")}, "timeout_s"), ({"timeout_s": -1.0}, "timeout_s"), ({"timeout_s": "5"}, "timeout_s"),
    ({"memory_mb": 0}, "memory_mb"), ({"memory_mb": -5}, "memory_mb"), ({"memory_mb": 256.5}, "memory_mb"),
    ({"max_open_files": 0}, "max_open_files"), ({"max_open_files": -1}, "max_open_files"),
    ({"max_processes": 1}, "max_processes"), ({"scratch_mb": 0}, "scratch_mb"),
    ({"max_output_bytes": -1}, "max_output_bytes"), ({"source": b"print(1)"}, "source"),
    ({"stdin": None}, "stdin"), ({"stdin": b"1\n"}, "stdin"),
    ({"timeout_s": 1e10}, r"timeout_s must be a number of seconds > 0 and at most 1e\+06"),
    ({"source": "print('\ud800')"}, r"source is not valid Unicode: '\\ud800' at index 7"),
    ({"stdin": "1\ud800"}, r"stdin is not valid Unicode: '\\ud800' at index 1"),
])
def test_rejects_bad_limits(arguments, named):
    call = {"source": "print(1)", **arguments}
    with pytest.raises(ValueError, match=named):
        sandbox.run_code(call.pop("source"), **call)


def test_a_numpy_timeout_is_a_number():
    assert run("print(1)", limit_s=5.0, timeout_s=np.float32(2.0)).status == "ok"


def test_an_error_in_the_caller_mid_run_leaves_nothing_running(monkeypatch):
    """An exception (an interrupt) while the program runs: its sandbox, children and cgroup go before it
    propagates."""
    marker = f"fastrft-orphan-{uuid.uuid4().hex}"
    source = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', "
              f"'{marker}'])\ntime.sleep(30)")
    groups = []
    new_group = sandbox._new_group
    monkeypatch.setattr(sandbox, "_new_group", lambda limits: groups.append(new_group(limits)) or groups[-1])

    def interrupted(self):
        deadline = time.monotonic() + 5.0
        while not _host_processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox._Run, "pump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_code(source, timeout_s=20.0, memory_mb=256, max_processes=16)
    assert _host_processes_with(marker) == []
    assert all(not os.path.exists(d) for group in groups if group for d in group.dirs)


def test_run_many_rejects_bad_jobs():
    with pytest.raises(ValueError, match="job 1"):
        sandbox.run_many(["print(1)", ("print(1)", None)])
    with pytest.raises(ValueError, match="workers"):
        sandbox.run_many(["print(1)"], workers=0)


def test_the_fallback_refuses_a_share_too_small_to_start(monkeypatch):
    monkeypatch.setattr(sandbox, "_memory_place", ("rlimit", {}, "forced by the test"))
    monkeypatch.setattr(sandbox, "_rlimit_warned", False)
    with pytest.raises(ValueError, match=r"256 // 16 = 16 MB.*raise memory_mb or lower max_processes"):
        sandbox.run_code("print(1)", memory_mb=256, max_processes=16)
    with pytest.warns(RuntimeWarning, match="no memory cgroup can be created here"):
        r = run("print(1)", memory_mb=256, max_processes=4)
    assert (r.status, r.memory_mechanism, r.peak_memory_mb) == ("ok", "rlimit", None)


def test_a_named_cgroup_that_is_not_one_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_memory_place", None)
    monkeypatch.setenv(sandbox.CGROUP_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=sandbox.CGROUP_ENV):
        sandbox.memory_mechanism()


def test_no_cgroup_is_left_behind():
    place = sandbox._find_memory_place()
    if place[0] == "rlimit":
        pytest.skip("no cgroups here")
    results = _bounded(30.0, sandbox.run_many, ["print(1)", "raise SystemExit(1)", "while True: pass"] * 2,
                       workers=3, **{**SMALL, "timeout_s": 0.5})
    assert [r.status for r in results] == ["ok", "runtime_error", "timeout"] * 2
    leftovers = [name for parent in place[1].values() for name in os.listdir(parent)
                 if name.startswith(f"fastrft-sandbox-{os.getpid()}-")]
    assert leftovers == []
