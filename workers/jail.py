"""How a sandbox is isolated: bubblewrap namespaces, one uid per slot, and cgroups for the tree.

A *slot* is a place a sandbox runs in: its own unprivileged uid (so per-uid process limits cannot
be multiplied by forking) and, where the host lets us, its own memory and pids cgroup covering
every process the call starts. A worker holds as many slots as it can run sandboxes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from workers import WorkerError

log = structlog.get_logger(__name__)

RUNTIME_SOURCE = Path(__file__).resolve().parent.parent / "sdk" / "runtime"
SANDBOX_RUNTIME = "/ultralight"
SANDBOX_UID = 1000
CGROUP_ROOT = Path("/sys/fs/cgroup")


class JailError(WorkerError):
    """The isolation the operator asked for is not available here."""


class Isolation(enum.StrEnum):
    BWRAP = "bwrap"
    # Development only: a plain child process with rlimits, no namespaces.
    PROCESS = "process"


@dataclasses.dataclass(frozen=True)
class Jail:
    """Builds the command line that starts one sandboxed interpreter."""

    level: Isolation
    python: str
    runtime_dir: Path
    tmp_mb: int = 16
    python_prefix: str = ""

    def command(self, limits_json: str, request_fd: int, reply_fd: int) -> list[str]:
        if self.level is Isolation.PROCESS:
            script = str(self.runtime_dir / "_ul_runtime.py")
            return [self.python, "-I", "-S", "-B", script, limits_json, str(request_fd),
                    str(reply_fd)]
        script = f"{SANDBOX_RUNTIME}/_ul_runtime.py"
        return [*self.bwrap_prefix(), "/usr/bin/python3", "-I", "-S", "-B", script, limits_json,
                str(request_fd), str(reply_fd)]

    def zygote_command(self, control_fd: int) -> list[str]:
        """The fork server of one slot: see sdk/runtime/_ul_zygote.py."""
        return [*self.bwrap_prefix(zygote=True), "/usr/bin/python3", "-I", "-S", "-B",
                f"{SANDBOX_RUNTIME}/_ul_zygote.py", str(control_fd)]

    def bwrap_prefix(self, zygote: bool = False) -> list[str]:
        """bubblewrap's arguments for a sandbox, or for a slot's zygote.

        A zygote keeps the right to create user namespaces, since each call it forks needs one
        of its own (each call then forbids any further one itself), and CAP_SYS_ADMIN in its own
        user namespace, to give each call a PID, mount and IPC namespace. Its root and /dev are
        read-only and it has no /tmp of its own: every call mounts a fresh /tmp and /dev/shm, so
        nothing a call writes outlives it.
        """
        argv = ["bwrap", "--unshare-all", "--unshare-user"]
        if zygote:
            # Within its own user namespace only: to make each call's PID namespace.
            argv += ["--cap-add", "CAP_SYS_ADMIN"]
        else:
            argv.append("--disable-userns")
        argv += [
            "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--ro-bind", "/usr/lib", "/usr/lib", "--symlink", "usr/lib", "/lib",
        ]
        if Path("/usr/lib64").is_dir():
            argv += ["--ro-bind", "/usr/lib64", "/usr/lib64", "--symlink", "usr/lib64", "/lib64"]
        if self.python_prefix and not self.python_prefix.startswith("/usr/"):
            argv += ["--ro-bind", self.python_prefix, self.python_prefix]
        argv += ["--ro-bind", self.python, "/usr/bin/python3"]
        for hidden in self._site_packages():
            argv += ["--tmpfs", hidden, "--remount-ro", hidden]
        argv += ["--ro-bind", str(self.runtime_dir), SANDBOX_RUNTIME, "--proc", "/proc",
                 "--dev", "/dev"]
        if zygote:
            argv += ["--dir", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/"]
        else:
            argv += ["--size", str(self.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp", "--chdir", "/tmp"]
        argv += [
            "--clearenv",
            "--setenv", "PATH", "/usr/bin", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "HOME", "/tmp",
            # Per-thread malloc arenas would spend the address-space limit on reservations.
            "--setenv", "MALLOC_ARENA_MAX", "2",
        ]
        return argv

    def _site_packages(self) -> list[str]:
        """Third-party packages of the host stay hidden: the app sees the standard library."""
        candidates = [Path("/usr/lib/python3/dist-packages")]
        if self.python_prefix:
            candidates += Path(self.python_prefix).glob("lib/python3*/site-packages")
        return [str(p) for p in candidates if p.is_dir()]


def install_runtime(base: Path | None = None) -> Path:
    """Copy the in-sandbox runtime to a world-readable folder named by its content."""
    files = sorted(RUNTIME_SOURCE.glob("*.py"))
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files))
    target = (base or Path(tempfile.gettempdir())) / f"ultralight-runtime-{digest.hexdigest()[:16]}"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".ultralight-runtime-", dir=target.parent))
    for source in files:
        shutil.copyfile(source, staging / source.name)
        (staging / source.name).chmod(0o644)
    staging.chmod(0o755)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another worker installed it first
    return target


def make_jail(level: str, python: str, tmp_mb: int) -> Jail:
    """The jail for the configured isolation level, checked to work before any call uses it."""
    try:
        isolation = Isolation(level)
    except ValueError:
        raise JailError(f"unknown sandbox isolation {level!r}; use 'bwrap' (production) or "
                        "'process' (development only)") from None
    runtime = install_runtime()
    if isolation is Isolation.PROCESS:
        return Jail(isolation, python or sys.executable, runtime, tmp_mb)
    if shutil.which("bwrap") is None:
        raise JailError("bubblewrap (bwrap) is not installed: install the Debian package "
                        "'bubblewrap', or set ULTRALIGHT_SANDBOX_ISOLATION=process for "
                        "development only")
    chosen = python or "/usr/bin/python3"
    real = os.path.realpath(chosen)
    prefix = _prefix_of(real)
    return Jail(isolation, real, runtime, tmp_mb, prefix)


def _prefix_of(python: str) -> str:
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise JailError(f"cannot run the sandbox interpreter {python}: {exc}") from exc
    return out.stdout.strip()


def probe(jail: Jail, slot: Slot) -> None:
    """Start one sandboxed interpreter; a JailError says why it cannot work here."""
    if jail.level is Isolation.PROCESS:
        return
    argv = [*jail.bwrap_prefix(), "/usr/bin/python3", "-I", "-S", "-c", "print('ok')"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20,
                              **slot.popen_user())  # type: ignore[call-overload]
    except (OSError, subprocess.SubprocessError) as exc:
        raise JailError(f"bubblewrap could not start: {exc}") from exc
    if done.returncode != 0 or done.stdout.strip() != "ok":
        raise JailError("bubblewrap cannot create a sandbox here (are user namespaces "
                        f"allowed?): {done.stderr.strip()[-300:]}; set "
                        "ULTRALIGHT_SANDBOX_ISOLATION=process for development only")


# Slots: a uid and a cgroup each.

@dataclasses.dataclass
class Cgroup:
    """A memory and pids cgroup (v1 controllers or one v2 group) for one slot's process tree.

    Processes always move into every controller together, so the pids controller's list names
    them all. Files are read and written with bare system calls: these run for every call.
    """

    version: int
    paths: dict[str, Path]

    def __post_init__(self) -> None:
        self._procs_files = [str(p / "cgroup.procs") for p in dict.fromkeys(self.paths.values())]
        self._list_file = str(self.paths["pids"] / "cgroup.procs")
        if self.version == 1:
            self._memory_file = str(self.paths["memory"] / "memory.failcnt")
        else:
            self._memory_file = str(self.paths["memory"] / "memory.events")
        self._pids_file = str(self.paths["pids"] / "pids.events")

    def add(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            self.enter(pid)

    def enter(self, pid: int) -> None:
        """Move one process in: what it starts afterwards is born inside."""
        for path in self._procs_files:
            _write_file(path, str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read_file(self._list_file).split()]
        except OSError:
            return []

    def signal_all(self, signum: int) -> int:
        """Send a signal to every process in the group once; how many there were."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return len(pids)

    async def drain(self, timeout_s: float = 2.0) -> bool:
        """Like ``kill_all``, without blocking the event loop; False if something lingers."""
        deadline = time.monotonic() + timeout_s
        pause = 0.0005
        while self.signal_all(signal.SIGKILL):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    def kill_all(self, timeout_s: float = 2.0) -> bool:
        """SIGKILL everything in the group until it is empty; False if something lingers."""
        deadline = time.monotonic() + timeout_s
        while self.signal_all(signal.SIGKILL):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def counters(self) -> tuple[int, int]:
        """How often the group has hit its memory and its pids limit so far."""
        return self._memory_failures(), self.pids_events()

    def _memory_failures(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = _read_file(self._memory_file)
            if self.version == 1:
                return int(text)
            return sum(int(line.split()[1]) for line in text.splitlines()
                       if line.startswith(("oom_kill ", "max ")))
        return 0

    def hit_memory_limit(self, before: int) -> bool:
        return self._memory_failures() > before

    def hit_pids_limit(self, before: int) -> bool:
        return self.pids_events() > before

    def pids_events(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(_read_file(self._pids_file).split()[1])
        return 0

    def remove(self) -> None:
        self.kill_all()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                path.rmdir()


def _read_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65_536).decode()
    finally:
        os.close(fd)


def _write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _own_cgroup(controller: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(",") or (controller == "" and names == ""):
                return path
    return None


def create_cgroup(name: str, memory_bytes: int, pids_max: int) -> Cgroup | None:
    """A cgroup for one slot, or None when the host does not let us make one."""
    v1 = {c: CGROUP_ROOT / c for c in ("memory", "pids")}
    if all((p / "cgroup.procs").exists() for p in v1.values()):
        paths = {}
        for controller, root in v1.items():
            own = _own_cgroup(controller)
            if own is None:
                return None
            paths[controller] = root / own.lstrip("/") / name
        return _make(Cgroup(1, paths), memory_bytes, pids_max)
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        own = _own_cgroup("")
        if own is None:
            return None
        path = CGROUP_ROOT / own.lstrip("/") / name
        return _make(Cgroup(2, {"memory": path, "pids": path}), memory_bytes, pids_max)
    return None


def _make(group: Cgroup, memory_bytes: int, pids_max: int) -> Cgroup | None:
    try:
        for path in set(group.paths.values()):
            path.mkdir(exist_ok=True)
        if group.version == 1:
            (group.paths["memory"] / "memory.limit_in_bytes").write_text(str(memory_bytes))
            (group.paths["pids"] / "pids.max").write_text(str(pids_max))
        else:
            (group.paths["memory"] / "memory.max").write_text(str(memory_bytes))
            (group.paths["memory"] / "memory.swap.max").write_text("0")
            (group.paths["pids"] / "pids.max").write_text(str(pids_max))
    except OSError as exc:
        log.debug("cgroup_unavailable", error=str(exc))
        for path in set(group.paths.values()):
            with contextlib.suppress(OSError):
                path.rmdir()
        return None
    return group


@dataclasses.dataclass
class Slot:
    index: int
    uid: int | None
    cgroup: Cgroup | None
    lock_fd: int | None = None

    def popen_user(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.uid, "extra_groups": []}


def allocate_slots(count: int, uid_base: int, memory_bytes: int, pids_max: int,
                   use_uids: bool) -> list[Slot]:
    """Take ``count`` slots whose uids no other worker on this machine holds (flock files)."""
    can_switch = use_uids and os.geteuid() == 0
    lock_dir = Path(tempfile.gettempdir()) / "ultralight-slots"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    instance = secrets.token_hex(4)
    slots: list[Slot] = []
    candidate = uid_base
    while len(slots) < count:
        uid, fd = None, None
        if can_switch:
            uid, fd = _lock_uid(lock_dir, candidate, uid_base + 100_000)
            candidate = uid + 1
        # Named after the slot's uid, which this process holds alone on this machine; a pid
        # is not unique where workers run as pid 1 of their own PID namespaces.
        name = (f"ultralight-uid-{uid}" if uid is not None
                else f"ultralight-{os.getpid()}-{instance}-{len(slots)}")
        slots.append(Slot(len(slots), uid, create_cgroup(name, memory_bytes, pids_max), fd))
    return slots


def _lock_uid(lock_dir: Path, start: int, stop: int) -> tuple[int, int]:
    for uid in range(start, stop):
        fd = os.open(lock_dir / f"uid-{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise JailError(f"no free sandbox uid between {start} and {stop}")


def release_slots(slots: list[Slot]) -> None:
    for slot in slots:
        if slot.cgroup is not None:
            slot.cgroup.remove()
        if slot.lock_fd is not None:
            os.close(slot.lock_fd)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (any of its threads), from /proc."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def reap_orphaned_inits() -> int:
    """Reap dead pid-1 processes of sandboxes that were left to this process; how many.

    bubblewrap's outer process exits as soon as its sandbox's pid 1 reports, before that pid 1
    is gone; if this process is a subreaper or pid 1 itself, the orphan is reparented here and
    stays a zombie (holding a slot in its pids cgroup) until reaped. Only zombies started in a
    nested PID namespace are reaped: this process's own children belong to asyncio.
    """
    reaped = 0
    for pid in children(os.getpid()):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, IndexError):
            continue
        levels = status.split("NSpid:", 1)[-1].split("\n", 1)[0].split()
        if len(levels) >= 2:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
    return reaped


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc."""
    found, frontier = [pid], [pid]
    while frontier:
        below = children(frontier.pop())
        found += below
        frontier += below
    return found
