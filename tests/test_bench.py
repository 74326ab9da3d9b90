"""The benchmark still runs end to end: ``python -m bench --tiny`` on a very small sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import REPO

SECTIONS = {"latency", "throughput", "isolation", "gates", "query", "replay"}


@pytest.mark.timeout(180)
def test_tiny_run_writes_every_section(tmp_path: Path) -> None:
    """A tiny run starts its own farm, measures every section and writes JSON and tables."""
    done = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=170)

    assert done.returncode == 0, done.stderr[-3000:]
    results = orjson.loads((tmp_path / "tiny.json").read_bytes())
    assert set(results["sections"]) == SECTIONS
    assert results["errors"] == {}
    assert {figure["section"] for figure in results["figures"]} == SECTIONS
    for section in SECTIONS - {"replay"}:
        assert results["sections"][section], f"{section} is empty"
    assert results["sections"]["latency"]["mcp_client"]["n"] > 0
    assert results["sections"]["throughput"]["farm"]["2"][0]["calls_per_s"] > 0
    assert results["sections"]["query"]["query_ms"]["p50"] > 0
    assert {"cpu_model", "cores", "memory_gib", "kernel", "python"} <= set(results["machine"])
    assert "trivial call p50" in done.stdout
    assert (tmp_path / "tiny.md").read_text().count("\n|") >= len(results["figures"])
    if results["chart"] is None:
        assert "matplotlib" in results["chart_skipped"]
    else:
        assert (tmp_path / "tiny.png").stat().st_size > 0
