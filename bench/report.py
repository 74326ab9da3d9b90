"""What a run leaves behind: the machine it ran on, a results table, the JSON file and a chart."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from bench.stats import Figure

COLUMNS = ("figure", "value", "comparison (same run)", "ratio", "target", "met?")


def machine() -> dict[str, Any]:
    return {
        "cpu_model": _cpuinfo("model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": platform.python_version(),
        "redis_server": _version(["redis-server", "--version"]),
        "bwrap": _version(["bwrap", "--version"]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _cpuinfo(field: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _os_release() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else None


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, "
            f"{info['kernel']}, Python {info['python']}")


# The table.

def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    size = abs(value)
    if size >= 100:
        text = f"{value:,.0f}"
    elif size >= 10:
        text = f"{value:.1f}"
    elif size >= 1:
        text = f"{value:.2f}"
    elif size == 0:
        text = "0"
    else:
        text = f"{value:.2g}"
    return f"{text} {unit}".strip()


def ratio(value: float | None) -> str:
    if value is None or value <= 0:
        return "–"
    if value >= 1:
        return f"{value:,.0f}×" if value >= 100 else f"{value:.2g}×"
    inverse = 1 / value
    return f"1/{inverse:,.0f}" if inverse >= 100 else f"1/{inverse:.2g}"


def met(figure: Figure) -> str:
    if figure.note.startswith("not measured"):
        return "not measured"
    if figure.note.startswith("failed"):
        return "failed"
    if figure.met is None:
        return "–" if not figure.targets else "?"
    return "yes" if figure.met else "NO"


def rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for figure in figures:
        name = figure.name if figure.value is not None or not figure.note else \
            f"{figure.name} ({figure.note})"
        comparison = f"{figure.comparison}: {number(figure.comparison_value, figure.unit)}" \
            if figure.comparison else "–"
        found.append((name, number(figure.value, figure.unit), comparison, ratio(figure.ratio),
                      figure.target_text or "–", met(figure)))
    return found


def text_table(figures: list[Figure]) -> str:
    """Plain text, aligned columns, one block per section."""
    body = rows(figures)
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *body, strict=False)]
    lines, section = [], None

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines.append(line(COLUMNS))
    lines.append(line(tuple("-" * w for w in widths)))
    for figure, cells in zip(figures, body, strict=True):
        if figure.section != section:
            if section is not None:
                lines.append("")
            lines.append(f"[{figure.section}]")
            section = figure.section
        lines.append(line(cells))
    return "\n".join(lines)


def short_client(name: str | None) -> str:
    """A few words for the table; the JSON keeps the full description."""
    if not name:
        return "–"
    for start, short in (("mcp ", "official MCP client"), ("httpx2", "httpx2 POST"),
                         ("arq", "arq"), ("aiohttp", "aiohttp POST"),
                         ("gateway.replay_cli", "replay_cli"), ("workers.pool", "pool, direct"),
                         ("workers.appdata", "SqliteAppData")):
        if name.startswith(start):
            return short
    return name


def markdown_table(figures: list[Figure]) -> str:
    body = rows(figures)
    columns = ("section", COLUMNS[0], "client", *COLUMNS[1:])
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for figure, cells in zip(figures, body, strict=True):
        escaped = [c.replace("|", "\\|") for c in
                   (figure.section, cells[0], short_client(figure.client), *cells[1:])]
        lines.append("| " + " | ".join(escaped) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any], figures: list[Figure]) -> str:
    """The table as the README shows it, with the machine and how busy it was."""
    info = results["machine"]
    mode = results["mode"]
    start, end = (" / ".join(f"{x:g}" for x in info[key])
                  for key in ("load_average_at_start", "load_average_at_end"))
    return (f"Measured {results['finished_at']} with `python -m bench"
            f"{'' if mode == 'full' else ' --' + mode}` ({results['elapsed_s']:.0f} s) on "
            f"{machine_line(info)}; load average (1 / 5 / 15 min) {start} at the start, {end} "
            f"at the end.\n\n"
            f"{markdown_table(figures)}\n")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


# The chart.

def chart(results: dict[str, Any], path: Path) -> str | None:
    """Latency distribution and throughput by concurrency as a PNG; the reason when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _latency_panel(left, results["sections"].get("latency", {}))
    _throughput_panel(right, results["sections"].get("throughput", {}))
    figure.suptitle(f"Ultralight benchmarks ({results['mode']}), "
                    f"{machine_line(results['machine'])}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def _latency_panel(axes: Any, latency: dict[str, Any]) -> None:
    samples = latency.get("samples_ms", {})
    labels = {"mcp_client": "farm, official MCP client", "raw_http": "farm, bare httpx2 POST",
              "arq_default": "arq default (enqueue + job.result())"}
    for key, label in labels.items():
        values = sorted(samples.get(key) or [])
        if not values:
            continue
        share = [(i + 1) / len(values) for i in range(len(values))]
        axes.step(values, share, where="post", label=f"{label} (n={len(values)})")
    floor = (latency.get("in_process") or {}).get("p50")
    if floor:
        # Far left of everything else: named in the legend rather than drawn.
        axes.plot([], [], " ", label=f"in-process call p50 (the floor): {floor:.2g} ms")
    axes.set_xscale("log")
    axes.set_xlabel("latency of one sequential trivial call (ms, log scale)")
    axes.set_ylabel("share of calls at or below")
    axes.set_title("Latency distribution")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")


def _throughput_panel(axes: Any, throughput: dict[str, Any]) -> None:
    for count, loads in (throughput.get("farm") or {}).items():
        axes.plot([load["concurrency"] for load in loads], [load["calls_per_s"] for load in loads],
                  marker="o", label=f"farm, {count} worker process{'es' if count != '1' else ''}")
    arq = throughput.get("arq_default") or []
    if arq:
        axes.plot([load["concurrency"] for load in arq], [load["calls_per_s"] for load in arq],
                  marker="s", linestyle="--", label="arq default, 1 worker, no sandbox")
    axes.axhline(400, color="grey", linestyle=":", label="target 400 calls/s")
    levels = sorted({load["concurrency"] for loads in (throughput.get("farm") or {}).values()
                     for load in loads})
    axes.set_xscale("log", base=2)
    if levels:
        axes.set_xticks(levels, [str(level) for level in levels])
    axes.set_xlabel("concurrent callers (closed loop)")
    axes.set_ylabel("calls/s")
    axes.set_title("Throughput of trivial calls")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
