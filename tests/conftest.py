"""Shared fixtures: a real redis-server, and farms of real gateway and worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_APPS = REPO.parent / "shared" / "apps"
EXAMPLES = REPO / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout_s} s")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]


def start_redis(directory: Path, port: int | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run scripts/test.sh, which installs it")
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port), 10, "redis-server did not listen")
    return RedisServer(f"redis://127.0.0.1:{port}/0", port, proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_process(server.proc)


@dataclasses.dataclass
class Farm:
    """Real gateway and worker processes sharing one Redis and one data folder."""

    data_dir: Path
    env: dict[str, str]
    gateways: list[tuple[str, subprocess.Popen[bytes]]]
    workers: list[subprocess.Popen[bytes]]
    token: str
    log_dir: Path

    @property
    def url(self) -> str:
        return self.gateways[0][0]

    def cli(self, *args: str, token: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "ULTRALIGHT_URL": self.url,
               "ULTRALIGHT_TOKEN": self.token if token is None else token}
        result = subprocess.run([sys.executable, "-m", "gateway", *args], env=env, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ultralight {' '.join(args)} failed: {result.stderr}")
        return result

    def deploy(self, path: Path, name: str, *extra: str) -> str:
        out = self.cli("deploy", str(path), "--name", name, *extra).stdout
        return out.split(" version ")[1].split()[0]

    def new_token(self, email: str) -> str:
        return self.cli("token", "create", "--email", email).stdout.strip()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_dir.glob("*.log"))

    def http(self, token: str | None = None) -> httpx2.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx2.Client(base_url=self.url, headers=headers, timeout=60)

    def add_worker(self, *args: str, wrap: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        index = len(self.workers)
        log = (self.log_dir / f"worker{index}.log").open("wb")
        proc = subprocess.Popen([*wrap, sys.executable, "-m", "gateway", "worker", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(proc)
        return proc

    def add_gateway(self) -> str:
        port = free_port()
        log = (self.log_dir / f"gateway{len(self.gateways)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        self.gateways.append((url, proc))
        wait_until(lambda: port_open(port), 30, "the gateway did not listen")
        return url

    def stop(self) -> None:
        for _, proc in self.gateways:
            stop_process(proc)
        for proc in self.workers:
            stop_process(proc)


def start_farm(redis_url: str, *, workers: int = 1, gateways: int = 1,
               settings: dict[str, str] | None = None) -> Farm:
    data_dir = Path(tempfile.mkdtemp(prefix="ultralight-farm-"))
    log_dir = data_dir / "logs"
    log_dir.mkdir()
    env = {
        **os.environ,
        "ULTRALIGHT_DATA_DIR": str(data_dir),
        "ULTRALIGHT_REDIS_URL": redis_url,
        "ULTRALIGHT_QUEUE_NAME": f"ultralight:test:{data_dir.name}",
        "ULTRALIGHT_REPLAY_QUEUE_NAME": f"ultralight:test-replays:{data_dir.name}",
        # Workers drain for at most this long on SIGTERM; tests stop farms quickly.
        "ULTRALIGHT_MAX_CALL_TIMEOUT_S": "30",
        "ULTRALIGHT_LOG_FORMAT": "json",
        "PYTHONPATH": str(REPO),
        **(settings or {}),
    }
    farm = Farm(data_dir, env, [], [], "", log_dir)
    token = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--email",
                            "owner@example.test"], env=env, text=True, capture_output=True,
                           check=True).stdout.strip()
    farm.token = token
    try:
        for _ in range(gateways):
            farm.add_gateway()
        if farm.gateways:
            farm.env.setdefault("ULTRALIGHT_GATEWAY_URL", farm.url)
        for _ in range(workers):
            farm.add_worker()
        wait_until(lambda: _workers_up(farm, workers), 30, "workers did not start")
    except BaseException:
        farm.stop()  # a farm that did not come up must not leave processes behind
        raise
    return farm


def _workers_up(farm: Farm, count: int) -> bool:
    return farm.logs().count('"worker_started"') >= count


@pytest.fixture(scope="module")
def farm(redis_server: RedisServer) -> Iterator[Farm]:
    """One gateway and one worker process, with short call deadlines for the tests."""
    running = start_farm(redis_server.url, settings={"ULTRALIGHT_CALL_TIMEOUT_S": "6"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def deployed(farm: Farm) -> dict[str, str]:
    """The shared example apps deployed as they are: name -> version."""
    return {
        "notes": farm.deploy(SHARED_APPS / "notes.py", "notes"),
        "units": farm.deploy(SHARED_APPS / "units.py", "units", "--public"),
    }


def rpc_body(method: str, params: dict[str, Any] | None = None, id: Any = 1) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        body["params"] = params
    return orjson.dumps(body)


# The suite's shared callers (one owner token, anonymous loopback) send far more requests a
# minute than the default rate limits allow; the tests of the limits set their own.
RELAXED_LIMITS = {
    "ULTRALIGHT_RATE_LIMIT_CALL_PER_MIN": "1000000",
    "ULTRALIGHT_RATE_LIMIT_LIST_PER_MIN": "1000000",
    "ULTRALIGHT_RATE_LIMIT_INITIALIZE_PER_MIN": "1000000",
    "ULTRALIGHT_WEEKLY_QUOTAS": "anonymous:0,free:0",
    "ULTRALIGHT_MAX_CALLS_IN_FLIGHT_PER_CALLER": "1000",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, value in RELAXED_LIMITS.items():
        os.environ.setdefault(name, value)


def modern_call(client: httpx2.Client, app: str, method: str,
                params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> httpx2.Response:
    """One stateless-era (2026-07-28) MCP request whose headers agree with its body."""
    version = "2026-07-28"
    params = {**(params or {}), "_meta": {"io.modelcontextprotocol/protocolVersion": version}}
    sent = {"Content-Type": "application/json", "Accept": "application/json",
            "MCP-Protocol-Version": version, "Mcp-Method": method}
    if method == "tools/call":
        sent["Mcp-Name"] = str(params.get("name"))
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    return client.post(f"/mcp/{app}", content=body, headers={**sent, **(headers or {})})
