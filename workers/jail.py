"""How a sandbox is isolated: bubblewrap namespaces, one uid per slot, and cgroups for the tree.

A *slot* is a place a sandbox runs in: its own unprivileged uid (so per-uid process limits cannot
be multiplied by forking) and, where the host lets us, its own memory and pids cgroup covering
every process the call starts. A worker holds as many slots as it can run sandboxes at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import os
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

    def bwrap_prefix(self) -> list[str]:
        argv = [
            "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
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
        argv += [
            "--ro-bind", str(self.runtime_dir), SANDBOX_RUNTIME,
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(self.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
            "--chdir", "/tmp", "--clearenv",
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
                              **slot.popen_user())
    except (OSError, subprocess.SubprocessError) as exc:
        raise JailError(f"bubblewrap could not start: {exc}") from exc
    if done.returncode != 0 or done.stdout.strip() != "ok":
        raise JailError("bubblewrap cannot create a sandbox here (are user namespaces "
                        f"allowed?): {done.stderr.strip()[-300:]}; set "
                        "ULTRALIGHT_SANDBOX_ISOLATION=process for development only")


# Slots: a uid and a cgroup each.

@dataclasses.dataclass
class Cgroup:
    """A memory and pids cgroup (v1 controllers or one v2 group) for one slot's process tree."""

    version: int
    paths: dict[str, Path]

    def add(self, pid: int) -> None:
        for path in self.paths.values():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill_all(self, timeout_s: float = 2.0) -> bool:
        """SIGKILL everything in the group until it is empty; False if something lingers."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def reset_counters(self) -> None:
        if self.version == 1:
            with contextlib.suppress(OSError):
                (self.paths["memory"] / "memory.failcnt").write_text("0")

    def hit_memory_limit(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            if self.version == 1:
                return int((self.paths["memory"] / "memory.failcnt").read_text()) > 0
            events = (self.paths["memory"] / "memory.events").read_text()
            return any(line.split()[1] != "0" for line in events.splitlines()
                       if line.startswith(("oom_kill", "max")))
        return False

    def hit_pids_limit(self, before: int) -> bool:
        return self.pids_events() > before

    def pids_events(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            events = (self.paths["pids"] / "pids.events").read_text().split()
            return int(events[1])
        return 0

    def remove(self) -> None:
        self.kill_all()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                path.rmdir()


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
    slots: list[Slot] = []
    candidate = uid_base
    while len(slots) < count:
        uid, fd = None, None
        if can_switch:
            uid, fd = _lock_uid(lock_dir, candidate, uid_base + 100_000)
            candidate = uid + 1
        name = f"ultralight-{os.getpid()}-{len(slots)}"
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


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc."""
    found, frontier = [pid], [pid]
    while frontier:
        current = frontier.pop()
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    children += [int(c) for c in (task / "children").read_text().split()]
        found += children
        frontier += children
    return found
