"""``ultralight dev`` brings up the whole farm, shows it working, and stops every child."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.conftest import REPO, free_port, port_open, wait_until
from tests.test_mcp_client import connect


async def test_dev_runs_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    """dev.json holds URL, token and apps; an MCP client calls an example; SIGINT ends all."""
    port = free_port()
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "dev", "--data-dir", str(tmp_path / "data"),
         "--port", str(port), "--workers", "1"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    info_path = tmp_path / "data" / "dev.json"
    try:
        wait_until(info_path.exists, 60, "dev.json was not written")
        info = orjson.loads(info_path.read_bytes())
        async with connect(info["apps"]["bookmarks"], info["token"]) as client:
            added = await client.call_tool("add_bookmark", {"url": "https://example.org",
                                                            "tags": ["x"]})
            listed = await client.call_tool("list_bookmarks", {"tag": "x"})
        output = (tmp_path / "dev.log").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)

    assert info["gateway_url"] == f"http://127.0.0.1:{port}"
    assert info["token"].startswith("ul_")
    assert set(info["apps"]) >= {"bookmarks", "textstats"}
    assert added.structured_content["url"] == "https://example.org"
    assert len(listed.structured_content["result"]) == 1
    assert "word_count" in output and "{'result': 5}" in output
    assert "mcpServers" in output and info["token"] in output
    assert code == 0
    time.sleep(0.5)
    assert not port_open(port)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
