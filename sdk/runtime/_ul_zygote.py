"""Fork server of one sandbox slot: a warm interpreter that forks each call into new namespaces.

Runs under bubblewrap (its own user namespace, PID, mount, network, IPC and UTS namespaces, no
new privileges) as ``python -I -S`` with only this folder on ``sys.path``; like the runtime, it
imports nothing of the worker. It keeps one capability, CAP_SYS_ADMIN within bubblewrap's
innermost user namespace, to give each call namespaces of its own. The worker sends each request
as one message on a SOCK_SEQPACKET socket: JSON, with the call's four pipe ends attached as
SCM_RIGHTS.
The zygote forks and answers with the child's pid; it never reads a call's data and holds its
pipes only while it forks.

One call is two processes:

B, forked into a new PID namespace whose pid 1 it is, keeps only the call's descriptors and waits
  for one byte on the request pipe (sent once B is in the slot's cgroup, so everything it starts
  is counted there). It then takes a mount and an IPC namespace of its own, mounts a fresh
  procfs, /tmp and /dev/shm, enters a user namespace of its own (fresh keyrings; the uid mapped
  to itself), forbids any further user namespace in it, forks C, reaps orphans, reports C's wait
  status on the status pipe and exits, which kills whatever is left in the namespace.
C drops every capability, joins a new session keyring, lowers its rlimits and then speaks the
  runtime's ordinary protocol (see _ul_runtime).
"""

from __future__ import annotations

import _signal
import array
import ctypes
import fcntl
import gc
import json
import os
import platform
import random
import signal
import socket
import struct
import sys

# Under -I the script's own folder is not on the path; the runtime beside it is needed at once.
sys.path[:] = [os.path.dirname(os.path.abspath(__file__)), *sys.path]
import _ul_runtime  # noqa: E402

EXIT_SETUP_FAILED = 98
# Descriptor numbers inside a call; the runtime's channel uses REQUEST_FD and REPLY_FD.
REQUEST_FD, REPLY_FD, STATUS_FD = 3, 4, 5
CALL_FDS = 4  # request (read), reply (write), output (write), status (write)

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 16384, 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# noroot and no_setuid_fixup set, keep_caps unset, all three locked: becoming root in the
# call's user namespace would give back no capability.
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20
LINUX_CAPABILITY_VERSION_3 = 0x20080522
KEYCTL_JOIN_SESSION_KEYRING = 1
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(platform.machine())
SIGCHLD, SIGINT, SIGKILL = int(signal.SIGCHLD), int(signal.SIGINT), int(signal.SIGKILL)
SIG_DFL = int(signal.SIG_DFL)


libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step that isolates a call failed; the call must not run."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def _fork() -> int:
    """fork(2) through the C library, without Python's own after-fork work.

    ``os.fork`` re-initialises interpreter state and runs every module's at-fork hooks in the
    child, which touches (and so copies) about two hundred pages of the zygote, some 0.5 ms per
    fork. None of it is needed here: the zygote is single-threaded and holds no lock while it
    forks, and the one hook that matters (``random``'s reseed) is done by hand in the call
    (see ``call_main``).
    """
    pid = libc.fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


def _prctl(option: int, arg: int, what: str) -> None:
    _check(libc.prctl(option, arg, 0, 0, 0), what)


def _set_name(name: bytes) -> None:
    """What ps and top show for this process."""
    libc.prctl(PR_SET_NAME, ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p).value, 0, 0, 0)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def raw(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None

    _check(libc.mount(raw(source), raw(target), raw(fstype), flags, raw(data)),
           f"mount {fstype or 'bind'} on {target}")


def _take_descriptors(fds: list[int]) -> None:
    """Keep only the call's pipes, at fixed numbers; everything else of the zygote is closed."""
    # Lift them above the fixed numbers first so that no dup2 overwrites one still needed.
    request, reply, output, status = (fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds)
    devnull = fcntl.fcntl(os.open("/dev/null", os.O_RDWR), fcntl.F_DUPFD, 64)
    for source, target in ((devnull, 0), (output, 1), (output, 2), (request, REQUEST_FD),
                           (reply, REPLY_FD), (status, STATUS_FD)):
        os.dup2(source, target)
    os.closerange(STATUS_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# B: pid 1 of the call.

def init(fds: list[int], message: bytes) -> None:
    """Pid 1 of the call's PID namespace; never returns."""
    try:
        request = json.loads(message)
        # _signal, not signal: the latter's enum conversions run (and copy) much more code.
        _signal.signal(SIGCHLD, SIG_DFL)
        _signal.signal(SIGINT, SIG_DFL)
        _set_name(b"ul-init")
        _take_descriptors(fds)
        if not os.read(REQUEST_FD, 1):
            os._exit(0)  # the worker gave up on this child before its call
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
        _prepare_mounts(int(request["tmp_bytes"]))
        _enter_own_user_namespace()
        _own_network()
        child = _fork()
        if child == 0:
            call_main(request)
    except BaseException as exc:  # a child of the zygote must never return into its loop
        _fail(exc)
    for fd in (0, 1, 2, REQUEST_FD, REPLY_FD):
        os.close(fd)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            os.write(STATUS_FD, b"%d\n" % status)
            os._exit(0)


def _enter_own_user_namespace() -> None:
    """A user namespace for this call alone, where no further one can be made."""
    uid, gid = os.getuid(), os.getgid()
    # Non-dumpable like the zygote, this process could not write its own uid_map.
    _prctl(PR_SET_DUMPABLE, 1, "dumpable")
    _check(libc.unshare(CLONE_NEWUSER), "unshare user namespace")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    # What bubblewrap's --disable-userns does: the count of user namespaces made here is capped
    # at zero, for C and everything it starts.
    _write("/proc/sys/user/max_user_namespaces", "0")
    # C, which has none of this process's capabilities, can neither trace nor read it.
    _prctl(PR_SET_DUMPABLE, 0, "not dumpable")


def _own_network() -> None:
    """A network namespace for this call alone, with only loopback, up.

    Made after the call's user namespace, which owns it, so this process may bring lo up; no
    counter, socket or TIME_WAIT entry of an earlier call in the slot is visible here.
    """
    _check(libc.unshare(CLONE_NEWNET), "unshare network namespace")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(probe, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _prepare_mounts(tmp_bytes: int) -> None:
    """A procfs of the call's PID namespace, and a /tmp and /dev/shm of its own.

    Everything else is read-only already: bubblewrap mounted the zygote's root and /dev so.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    options = f"size={tmp_bytes},mode=0755"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir("/tmp")


# C: the call itself.

def call_main(request: dict) -> None:
    """The process that runs the app; never returns."""
    try:
        os.close(STATUS_FD)
        _set_name(b"ul-call")
        _prctl(PR_SET_PDEATHSIG, SIGKILL, "die with parent")
        _join_new_session_keyring()
        _drop_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        _prctl(PR_SET_DUMPABLE, 1, "dumpable")
        _ul_runtime.set_limits(request["limits"])
    except BaseException as exc:  # no app code may run unless every step above succeeded
        _fail(exc)
    random.seed()  # forked without os.fork's hooks: every call would replay the same sequence
    channel = _ul_runtime.Channel(REQUEST_FD, REPLY_FD)
    channel.send({"op": "ready"})
    _ul_runtime.run(channel)
    _ul_runtime.flush_output()
    os._exit(0)


def _join_new_session_keyring() -> None:
    if SYS_KEYCTL is None:
        raise SetupError(f"no keyctl system call number known for {platform.machine()}")
    if libc.syscall(SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        if ctypes.get_errno() != 38:  # ENOSYS: a kernel without keyrings has none to share
            raise SetupError(f"session keyring: {os.strerror(ctypes.get_errno())}")


def _drop_capabilities() -> None:
    prctl = libc.prctl
    for cap in range(LAST_CAP + 1):
        if prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            raise SetupError(f"drop capability {cap} from the bounding set")
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
    _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, "securebits")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _fail(exc: BaseException) -> None:
    """Say which step failed (on the call's output, which the worker reports) and exit."""
    try:
        frame = exc.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = f" in {frame.tb_frame.f_code.co_name}" if frame is not None else ""
        os.write(2, f"sandbox setup failed{where}: {exc}\n".encode())
    finally:
        os._exit(EXIT_SETUP_FAILED)


# The zygote.

def _last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as handle:
        return int(handle.read())


LAST_CAP = 63


def serve(control: socket.socket) -> None:
    """Fork one call per request, until the worker closes the channel.

    Each fork write-protects all of this process's memory again, so every page the loop writes
    costs a page fault per call: the loop is kept to a few plain operations.
    """
    # The zygote's own PID namespace: after each fork its children go back to being made there.
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY)
    control.send(b'{"op": "hello"}')
    receive, send, fd_space = control.recvmsg, control.send, socket.CMSG_SPACE(4 * (CALL_FDS + 4))
    while True:
        message, ancillary, _, _ = receive(65_536, fd_space)
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not message:
            os._exit(0)  # the worker closed its end
        try:
            if len(fds) != CALL_FDS:
                raise ValueError("expected a fork request with the call's four pipes")
            pid = _fork_into_new_pid_namespace(own_pid_namespace)
            if pid == 0:
                control.close()
                init(list(fds), message)  # the request is read there, not here
            answer = b'{"pid": %d}' % pid
        except (ValueError, OSError, SetupError) as exc:
            answer = json.dumps({"error": str(exc)}).encode()
        finally:
            for fd in fds:
                os.close(fd)
        send(answer)


def _fork_into_new_pid_namespace(own: int) -> int:
    """Fork a child that is pid 1 of a new PID namespace; the zygote itself stays where it is."""
    _check(libc.unshare(CLONE_NEWPID), "unshare PID namespace")
    pid = libc.fork()
    failed = ctypes.get_errno()
    if pid != 0:
        _check(libc.setns(own, CLONE_NEWPID), "back to the zygote's PID namespace")
    if pid < 0:
        raise OSError(failed, f"fork failed: {os.strerror(failed)}")
    return pid


def main() -> None:
    global LAST_CAP
    control = socket.socket(fileno=int(sys.argv[1]))
    # Nothing of this process may be read or traced from the calls it forks.
    _prctl(PR_SET_DUMPABLE, 0, "not dumpable")
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    LAST_CAP = _last_cap()
    # bubblewrap's PID namespace belongs to a user namespace where this process has no
    # capability, so it could not return there after forking a call into a new one. The server
    # runs one level down instead, as pid 1 of a PID namespace of its own making; this process
    # only waits for it and exits with it (and bubblewrap with this process).
    _check(libc.unshare(CLONE_NEWPID), "unshare the zygote's PID namespace")
    server = os.fork()
    if server != 0:
        control.close()
        _, status = os.waitpid(server, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, SIGKILL, "die with parent")
    _set_name(b"ul-zygote")
    # Read by the C library at start-up; the calls' environment does not need to carry it.
    os.environ.pop("MALLOC_ARENA_MAX", None)
    # Children are reaped by the kernel: the zygote never waits.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # What calls would import on their own, loaded once and shared copy-on-write. Not asyncio:
    # it would make every fork slower (forks copy page tables), and only async tools need it.
    import linecache  # noqa: F401
    import threading  # noqa: F401
    import traceback  # noqa: F401

    import ultralight  # noqa: F401

    gc.freeze()
    serve(control)


if __name__ == "__main__":
    main()
