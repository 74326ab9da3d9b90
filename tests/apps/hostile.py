"""Hostile tools: each tries to break out, starve the worker, or outlive its call."""
import ctypes
import os
import signal
import socket
import threading
import time

import ultralight as ul

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def _name(label: bytes) -> None:
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)


def bystander(x: int) -> int:
    """A well-behaved call running beside each attack."""
    time.sleep(0.3)
    return x + 1


def spin() -> None:
    """Burns CPU until stopped."""
    while True:
        pass


def spin_in_children(n: int = 4) -> None:
    """Forks CPU burners, then waits."""
    for _ in range(n):
        if os.fork() == 0:
            _name(b"ul-hostile")
            while True:
                pass
    time.sleep(1000)


def hog_memory() -> None:
    """Allocates in one process until something gives."""
    blocks = []
    while True:
        blocks.append(bytearray(64 * 1024 * 1024))


def hog_memory_in_children(n: int = 12, mb: int = 200) -> str:
    """Spreads memory over many children so no single one hits its own limit."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            _name(b"ul-hostile")
            block = bytearray(mb * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(1000)
        pids.append(pid)
    time.sleep(1000)
    return "survived"


def fork_bomb() -> None:
    """Forks without end."""
    while True:
        os.fork()


def thread_bomb() -> int:
    """Starts sleeping threads without end."""
    threads = []
    while True:
        t = threading.Thread(target=time.sleep, args=(1000,), daemon=True)
        t.start()
        threads.append(t)


def open_files() -> int:
    """Opens files until the descriptor limit."""
    handles = []
    while True:
        handles.append(open("/dev/null"))


def fill_disk() -> int:
    """Writes to /tmp until it is full."""
    written = 0
    with open("/tmp/fill", "wb") as handle:
        while True:
            handle.write(b"x" * 1024 * 1024)
            handle.flush()
            written += 1


def endless_output() -> None:
    """Prints forever."""
    while True:
        print("spam" * 256)


def sleep_forever() -> None:
    """Sleeps past any deadline."""
    time.sleep(10_000)


def stop_self() -> None:
    """Stops itself with SIGSTOP, so it never answers."""
    os.kill(os.getpid(), signal.SIGSTOP)


def stopped_child() -> str:
    """Leaves a stopped child behind and returns."""
    if os.fork() == 0:
        _name(b"ul-hostile")
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    return "left a stopped child"


def daemon() -> str:
    """Double-forks a setsid daemon meant to outlive the call, then returns."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _name(b"ul-hostile")
            while True:
                with open("/tmp/daemon-alive", "w") as handle:
                    handle.write(str(time.time()))
                time.sleep(0.1)
        os._exit(0)
    time.sleep(0.2)
    return "daemon started"


def read_host_files() -> dict:
    """Tries to read host files; returns which it could."""
    paths = ["/etc/passwd", "/etc/shadow", "/root/.bashrc", "/work", "/home", "/var/run",
             "/run/redis", "/proc/1/environ", "/sys/kernel", "/etc/hostname"]
    found = {}
    for path in paths:
        try:
            found[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()[:80]
        except OSError as exc:
            found[path] = None
            del exc
    return {p: v for p, v in found.items() if v is not None}


def environment() -> dict:
    """Returns its whole environment."""
    return dict(os.environ)


def snoop_proc() -> dict:
    """Lists every process it can see and their command lines."""
    seen = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    seen[entry] = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                seen[entry] = None
    return seen


def kill_parent() -> str:
    """Sends SIGKILL to its parent and to pid 1 of what it sees."""
    for pid in {os.getppid(), 1}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)
    return "still here"


def kill_everything() -> str:
    """kill(-1, SIGKILL): everything this process may signal."""
    os.kill(-1, signal.SIGKILL)
    time.sleep(1)
    return "survived kill(-1)"


def ptrace_outside() -> int:
    """Tries to attach a tracer to every pid it cannot see; how many attaches succeeded."""
    PTRACE_ATTACH = 16
    visible = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    attached = 0
    for pid in range(1, 4096):
        if pid not in visible and libc.ptrace(PTRACE_ATTACH, pid, 0, 0) == 0:
            attached += 1
    return attached


def new_user_namespace() -> int:
    """Tries to gain capabilities through a nested user namespace."""
    CLONE_NEWUSER = 0x10000000
    result = libc.unshare(CLONE_NEWUSER)
    return ctypes.get_errno() if result != 0 else 0


def network(port: int) -> dict:
    """Tries loopback (where Redis and the gateway listen outside) and name resolution."""
    report = {"interfaces": [name for _, name in socket.if_nameindex()]}
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        report["loopback"] = "connected"
    except OSError as exc:
        report["loopback"] = type(exc).__name__
    try:
        socket.getaddrinfo("localhost.localdomain", 80)
        report["dns"] = "resolved"
    except OSError as exc:
        report["dns"] = type(exc).__name__
    return report


def leave_marker(secret: str) -> str:
    """Writes a secret to /tmp and sleeps, so a concurrent call may look for it."""
    with open("/tmp/secret.txt", "w") as handle:
        handle.write(secret)
    time.sleep(1.5)
    return "done"


def look_for_marker() -> dict:
    """Looks in /tmp and /proc for another call's secret."""
    found = {"tmp": sorted(os.listdir("/tmp"))}
    found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return found


def write_runtime() -> str:
    """Tries to overwrite the SDK inside the sandbox."""
    with open("/ultralight/ultralight.py", "a") as handle:
        handle.write("# owned")
    return "wrote"


def forge_result() -> None:
    """Writes garbage straight to the reply pipe, then exits."""
    for fd in range(3, 12):
        try:
            os.write(fd, b'{"op": "result", "value": NaN}\n')
        except OSError:
            pass
    os._exit(0)


def nan() -> float:
    """A NaN result."""
    return float("nan")


def huge_result() -> str:
    """A result over the 5 MB cap."""
    return "x" * (6 * 1024 * 1024)


def deep_result() -> list:
    """A result nested 200 levels deep."""
    value: list = []
    for _ in range(200):
        value = [value]
    return value


def flood_sdk(n: int = 20000) -> int:
    """Sends thousands of SDK requests."""
    for i in range(n):
        ul.load(f"k{i % 10}")
    return n


def oversized_value() -> None:
    """Stores a value far over the value cap."""
    ul.store("big", "x" * (8 * 1024 * 1024))


def crash() -> None:
    """Segfaults."""
    ctypes.string_at(0)
