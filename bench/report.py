"""The bench's output: one row per measurement against its target, the table and the chart of a run, the
machine and commit measured, and the check CI runs on the table (every declared row printed, each with its
figure).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from bench.harness import ROOT


@dataclass
class Row:
    """One line of the table. `modelfs` is the mount as configured by default (passthrough where the kernel allows
    it); read cases also measure the daemon read path (`daemon`, `daemon_ratio`), for the table and the chart."""

    case: str
    modelfs: str
    direct: str
    ratio: float | None
    target: str
    met: bool | None
    daemon: str = ""
    daemon_ratio: float | None = None
    higher: bool = True  # whether the ratio is of a throughput (else of a time)


def machine() -> list[str]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    import pyfuse3

    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "modelfs"], capture_output=True,
                           text=True).stdout.strip()
    return [
        f"modelfs at commit {commit}{' with uncommitted changes in modelfs/' if dirty else ''}",
        f"nproc {os.cpu_count()}, {mem.split(':')[1].strip()} memory, kernel {platform.release()}, "
        f"python {platform.python_version()}, pyfuse3 {pyfuse3.__version__}, "
        f"libfuse {libfuse_version()} (the one pyfuse3 loaded), {version(['curl', '--version']).split(' (')[0]}",
    ]


def libfuse_version() -> str:
    """The libfuse the daemon uses: the library file pyfuse3 loaded (a private build, not the system's fusermount3)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libfuse3.so."):
            return name.removeprefix("libfuse3.so.")
    return "?"


def has_figure(row: Row) -> bool:
    """A finite ratio to the direct path (and to the daemon path's, where measured), or for a row whose target is
    an absolute figure (p99 ms, MB, s/GiB), that figure measured against it."""
    def finite(x: float | None) -> bool:
        return x is not None and math.isfinite(x)

    if row.daemon_ratio is not None and not finite(row.daemon_ratio):
        return False
    return finite(row.ratio) if row.ratio is not None else row.met is not None


def check(case_rows: dict[str, list[Row]], declared: dict[str, tuple[str, ...]]) -> list[str]:
    """What is wrong with the rows each case of one run printed: a declared row (by a part of its label) a case did
    not print, a row without its figure (a skipped measurement), a row its case does not declare."""
    problems = []
    for case, rows in case_rows.items():
        expected = declared[case]
        problems += [f"{case}: no row '{part}'" for part in expected if not any(part in r.case for r in rows)]
        problems += [f"{case}: row '{r.case}' is not declared in ROWS (bench/run.py)" for r in rows
                     if not any(part in r.case for part in expected)]
        problems += [f"{case}: row '{r.case}' has no figure ({r.modelfs}, ratio {r.ratio})" for r in rows
                     if not has_figure(r)]
    return problems


def table(rows: list[Row]) -> list[str]:
    header = ("case", "modelfs", "direct", "ratio", "target", "met?", "daemon path", "daemon ratio")
    cells = [[r.case, r.modelfs, r.direct, "—" if r.ratio is None else f"{r.ratio:.2f}", r.target,
              "—" if r.met is None else ("yes" if r.met else "NO"), r.daemon or "—",
              "—" if r.daemon_ratio is None else f"{r.daemon_ratio:.2f}"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells, strict=True)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return out


def chart(rows: list[Row], out: Path, subtitle: str) -> str:
    """Grouped bars per read case: direct = 1.0, modelfs passthrough and daemon path as speed relative to it."""
    drawn = [r for r in rows if r.ratio is not None and r.daemon_ratio is not None and r.case != "page cache after a "
             "full read via mount"]
    if not drawn:
        return "chart: no case with the three paths measured"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib missing (.venv/bin/pip install -e '.[test]')"

    def speed(ratio: float | None, higher: bool) -> float:
        assert ratio is not None
        return ratio if higher else 1 / ratio  # time ratios become speed: direct time / modelfs time

    labels = [r.case.replace(" via mount", "").replace(" (daemon fallback)", "") for r in drawn]
    groups = {"direct path": [1.0] * len(drawn),
              "modelfs, passthrough (default)": [speed(r.ratio, r.higher) for r in drawn],
              "modelfs, daemon path (--passthrough off)": [speed(r.daemon_ratio, r.higher) for r in drawn]}
    colours = ("#9e9e9e", "#1f77b4", "#ff7f0e")
    fig, ax = plt.subplots(figsize=(11, 0.75 * len(drawn) + 1.8))
    height = 0.26
    for i, ((name, values), colour) in enumerate(zip(groups.items(), colours, strict=True)):
        ys = [n + (i - 1) * height for n in range(len(drawn))]
        bars = ax.barh(ys, values, height, label=name, color=colour)
        ax.bar_label(bars, [f"{v:.2f}" for v in values], padding=2, fontsize=7)
    ax.set_yticks(range(len(drawn)), [textwrap.fill(label, 42) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("speed relative to the direct path, same run (1.0 = as fast as direct; higher is better)")
    ax.set_xlim(0, max(1.25, max(max(v) for v in groups.values()) * 1.12))
    ax.set_title(f"modelfs reads: FUSE passthrough vs daemon path vs direct\n{subtitle}", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(drawn) - 0.02), ncol=3, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"chart: {out}"


#: Rows drawn by download_chart: the cold-download cases, each against `curl -o` (or curl then the load).
DOWNLOAD_ROWS = ("cold fetch", "cold load", "concurrent cold readers: wall")


def download_chart(rows: list[Row], out: Path, subtitle: str) -> str:
    """One bar per cold-download row: modelfs's speed relative to the direct path of the same run (curl), with
    the row's target as a tick."""
    drawn = [r for r in rows if r.ratio and any(k in r.case for k in DOWNLOAD_ROWS)]
    if not drawn:
        return "download chart: no download case measured"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "download chart skipped: matplotlib missing (.venv/bin/pip install -e '.[test]')"
    speeds = [r.ratio if r.higher else 1 / r.ratio for r in drawn if r.ratio]
    targets = [float(r.target.split()[1].rstrip("×")) for r in drawn]
    targets = [t if r.higher else 1 / t for t, r in zip(targets, drawn, strict=True)]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(drawn) + 1.6))
    bars = ax.barh(range(len(drawn)), speeds, 0.5, color=["#2ca02c" if r.met else "#d62728" for r in drawn])
    ax.bar_label(bars, [f"{v:.2f}" for v in speeds], padding=2, fontsize=8)
    ax.scatter(targets, range(len(drawn)), marker="|", s=400, color="black", label="target", zorder=3)
    ax.set_yticks(range(len(drawn)), [textwrap.fill(r.case, 48) for r in drawn], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16) if min(speeds + targets) / 2 <= t <= max(speeds) * 2]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("modelfs speed relative to the direct path of the same run (curl -o; for the readers row, one "
                  "reader); log scale, higher is better", fontsize=8)
    ax.set_title(f"modelfs cold downloads (green: target met)\n{subtitle}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"download chart: {out}"
