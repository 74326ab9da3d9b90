"""``ultralight dev``: Redis, a gateway and workers on this machine, with the examples deployed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.client import ClientError, GatewayClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STOP_STEPS_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(text: str = "") -> None:
    print(text, flush=True)


class Children:
    """The processes dev started; stopped in reverse order by steps (terminate, wait, kill)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env, **kwargs)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        return next((name for name, proc in self.procs if proc.poll() is not None), None)

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_STEPS_S)
            except subprocess.TimeoutExpired:
                say(f"  {name} did not stop in {STOP_STEPS_S:g} s; killing it")
                proc.kill()
                proc.wait()


def start_redis(children: Children, data_dir: Path, env: dict[str, str]) -> str:
    port = free_port()
    binary = shutil.which("redis-server")
    if binary:
        children.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
                       env, stdout=subprocess.DEVNULL)
    else:
        start_stand_in(port)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_port(port, 10.0, "Redis")
    return url


def start_stand_in(port: int) -> None:
    try:
        from fakeredis import TcpFakeServer
    except ImportError:
        raise SystemExit("redis-server is not installed and neither is fakeredis: install "
                         "Debian's redis-server package (apt-get install redis-server)") from None
    say("WARNING: redis-server is not installed; using an in-process stand-in (fakeredis). "
        "Install redis-server for anything but a quick look.")
    server = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    threading.Thread(target=server.serve_forever, daemon=True).start()


def wait_for_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening on port {port} within {timeout_s:g} s")


def wait_ready(client: GatewayClient, children: Children, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        crashed = children.dead()
        if crashed:
            raise SystemExit(f"the {crashed} process exited during start-up; see its log above")
        with contextlib.suppress(ClientError):
            client.api("GET", "/readyz")
            return
        time.sleep(0.1)
    raise SystemExit(f"the gateway was not ready within {timeout_s:g} s")


def create_token(env: dict[str, str]) -> str:
    from config import Settings
    from gateway.auth import issue_token
    from gateway.registry import open_registry

    settings = Settings.from_env(env)

    async def issue() -> str:
        registry = open_registry(settings.resolved_database_url)
        await registry.open()
        try:
            return (await issue_token(registry, "dev@localhost", "dev")).token
        finally:
            await registry.close()

    return asyncio.run(issue())


def deploy_examples(client: GatewayClient) -> list[str]:
    names = []
    for path in sorted(EXAMPLES.glob("*.py")):
        manifest_path = path.with_suffix(".manifest.json")
        manifest = orjson.loads(manifest_path.read_bytes()) if manifest_path.exists() else None
        result = client.api("POST", f"/api/apps/{path.stem}/versions",
                            {"source": path.read_text(), "manifest": manifest})
        say(f"  deployed {result['name']:<12} version {result['version']}  "
            f"tools: {', '.join(result['tools'])}")
        names.append(result["name"])
    return names


def self_check(client: GatewayClient) -> None:
    """One real call through the whole farm, so a newcomer sees it work."""
    started = time.perf_counter()
    result = client.rpc("textstats", "tools/call",
                        {"name": "word_count", "arguments": {"text": "it works end to end"}})
    elapsed = (time.perf_counter() - started) * 1000
    if result.get("isError"):
        raise SystemExit(f"self-check failed: {result['content'][0]['text']}")
    say(f"  textstats.word_count('it works end to end') -> {result['structuredContent']} "
        f"({elapsed:.1f} ms through gateway, Redis and a sandboxed worker)")


def run_dev(data_dir: Path, port: int, workers: int) -> int:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    children = Children()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    env = {**os.environ, "ULTRALIGHT_DATA_DIR": str(data_dir), "ULTRALIGHT_PORT": str(port),
           "ULTRALIGHT_LOG_FORMAT": os.environ.get("ULTRALIGHT_LOG_FORMAT", "console")}
    try:
        say(f"Ultralight dev: data in {data_dir}")
        env["ULTRALIGHT_REDIS_URL"] = start_redis(children, data_dir, env)
        token = create_token(env)
        command = [sys.executable, "-m", "gateway"]
        env["ULTRALIGHT_GATEWAY_URL"] = f"http://127.0.0.1:{port}"
        children.start("gateway", [*command, "serve"], env)
        children.start("workers", [*command, "worker", "--processes", str(workers),
                                   "--supervise"], env)
        url = f"http://127.0.0.1:{port}"
        client = GatewayClient(url, token)
        wait_ready(client, children, 30.0)
        apps = deploy_examples(client)
        self_check(client)
        announce(data_dir, url, token, apps, env["ULTRALIGHT_REDIS_URL"])
        while not stop.is_set():
            crashed = children.dead()
            if crashed:
                say(f"the {crashed} process exited; stopping")
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        say("stopping…")
        children.stop()
    return 0


def announce(data_dir: Path, url: str, token: str, apps: list[str], redis_url: str) -> None:
    mcp_urls = {name: f"{url}/mcp/{name}" for name in apps}
    info = {"gateway_url": url, "token": token, "apps": mcp_urls, "redis_url": redis_url}
    (data_dir / "dev.json").write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    config = {"mcpServers": {name: {"type": "http", "url": mcp_url,
                                    "headers": {"Authorization": f"Bearer {token}"}}
                             for name, mcp_url in mcp_urls.items()}}
    say()
    say(f"Gateway: {url}")
    say(f"Token:   {token}")
    for name, mcp_url in mcp_urls.items():
        say(f"MCP:     {mcp_url}   ({name})")
    say()
    say("MCP client config:")
    say(orjson.dumps(config, option=orjson.OPT_INDENT_2).decode())
    say()
    say(f"Written to {data_dir / 'dev.json'}. Try:")
    say(f"  ULTRALIGHT_URL={url} ULTRALIGHT_TOKEN={token} \\")
    say("    ultralight call bookmarks add_bookmark --args '{\"url\": \"https://example.org\"}'")
    say(f"Farm status: ultralight status --redis-url {redis_url}")
    say("Press Ctrl-C to stop.")
