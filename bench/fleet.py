"""Bench case `fleet`: a fleet's cold start at scale. N modelfs nodes (own daemon, mountpoint and store) open the
same >= 1 GiB GGUF model at once behind each shipped proxy config; the origin sends at most --rate per connection.
Target (issue 20): origin bytes <= 1.10x the model for the whole herd, herd wall <= 1.3x one download at the
origin's rate (size / rate). Then N fresh nodes read the model from the cache the herd filled (`warm`): what
copying it out of the cache costs this machine, apart from the fill. The machine's CPU (busy share of all CPUs,
other work on it included) is reported for the fill, for the rest of the herd, and for the warm herd.

    flock /tmp/modelfs-bench.lock .venv/bin/python -m bench.fleet --nodes 8 --size 1G --rate 12M
    ... --old-config FILE   adds the whole-blob case with an older nginx config (e.g. one from `git show`)

From the repository root, as root. One JSON line per case, then a table; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.harness import Janitor, start_mount
from modelfs.config import parse_size
from tests.support.fleet import CASES, Case, herd, settle, sha256_of, start_nodes
from tests.support.ggufmaker import make_gguf_of_size
from tests.support.mount import Mount
from tests.support.procs import Periodic

NAME = "fleet"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, all CPUs (/proc/stat), in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class Phases(Periodic):
    """While a herd runs: the machine's CPU and the origin's bytes once a second, to tell the fill (until the origin
    has sent the model) from what follows it (nodes waiting for a cache entry, then copying it out)."""

    def __init__(self, sent: Callable[[], int], size: int) -> None:
        super().__init__(lambda: self.samples.append((time.monotonic(), *cpu_jiffies(), sent())), 1.0)
        self.samples: list[tuple[float, int, int, int]] = []  # (time, busy, total, origin bytes)
        self._size = size

    def figures(self) -> dict[str, float]:
        """Seconds and machine CPU busy share (of all CPUs) in the fill and after it."""
        first, last = self.samples[0], self.samples[-1]
        filled = next((s for s in self.samples if s[3] - first[3] >= self._size), last)

        def busy(a: tuple[float, int, int, int], b: tuple[float, int, int, int]) -> float:
            return round((b[1] - a[1]) / max(1, b[2] - a[2]), 2)

        return {"fill_s": round(filled[0] - first[0], 1), "fill_cpu": busy(first, filled),
                "after_fill_s": round(last[0] - filled[0], 1), "after_fill_cpu": busy(filled, last)}


def run_case(work: Path, models: Path, sha: str, size: int, case: Case, nodes: int, rate: float,
             label: str) -> dict[str, object]:
    """One herd behind the case's proxy, then a warm herd of fresh nodes from the cache it filled."""
    janitor = Janitor()
    try:
        origin = case.origin(models, rate, work / "origin")
        janitor.push("origin", origin.stop)
        proxy = case.proxy(origin.port, work / "proxy")
        janitor.push("proxy", proxy.stop)

        def mounter(*args: str, mountpoint: Path, store: Path, env: dict[str, str] | None) -> Mount:
            return start_mount(janitor, mountpoint, store, args, mountpoint.parent / "modelfs.log", env)

        cold = start_nodes(nodes, work / "cold", proxy.url, mounter, env=case.node_settings())
        with Phases(lambda: origin.bytes_sent(NAME), size) as phases:
            result = herd(cold, NAME, sha, size, origin, timeout=3600)
        stored = all(settle(cold, NAME))
        for node in cold:
            node.stop()
        shutil.rmtree(work / "cold", ignore_errors=True)
        warm_nodes = start_nodes(nodes, work / "warm", proxy.url, mounter, env=case.node_settings())
        busy_before = cpu_jiffies()
        warm = herd(warm_nodes, NAME, sha, size, origin, timeout=3600)
        busy_after = cpu_jiffies()
        one = size / rate
        return {
            "config": label, "origin": case.origin_kind, "asks": "blob route" if case.blob_route or
            case.origin_kind != "export" else "export path", "nodes": nodes, "size": size, "one_s": round(one, 1),
            "gets": result.gets, "origin_x": round(result.ratio, 3), "wall_s": round(result.wall, 1),
            "wall_x": round(result.wall / one, 2), "nodes_s": [round(s, 1) for s in result.node_seconds],
            "right_bytes": all(result.digests_ok) and stored, "errors": result.errors,
            "target_met": result.ratio <= 1.10 and result.wall <= 1.3 * one and all(result.digests_ok),
            "warm_s": round(warm.wall, 1), "warm_x": round(warm.wall / one, 2), "warm_gets": warm.gets,
            "warm_nodes_s": [round(s, 1) for s in warm.node_seconds],
            "warm_right": all(warm.digests_ok) and not warm.errors,
            "warm_cpu": round((busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]), 2),
            **phases.figures(),
        }
    finally:
        janitor.close()
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| config | origin (nodes ask) | origin sent | GETs | herd | herd / one | fill, CPU busy | after the "
             "fill, CPU busy | warm herd, CPU busy | warm / one | target |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['origin']} ({r['asks']}) | {r['origin_x']:.2f}x | {r['gets']} | "
                     f"{r['wall_s']} s | {r['wall_x']:.2f}x | {r['fill_s']} s, {r['fill_cpu']:.0%} | "
                     f"{r['after_fill_s']} s, {r['after_fill_cpu']:.0%} | {r['warm_s']} s, {r['warm_cpu']:.0%} | "
                     f"{r['warm_x']:.2f}x | {'yes' if r['target_met'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="cases: " + ", ".join(f"{i}: {c.label}" for i, c in enumerate(CASES)))
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rate", default="12M", help="bytes/s per origin connection (M = MiB)")
    parser.add_argument("--old-config", type=Path, help="also run this nginx config as the whole-blob case")
    parser.add_argument("--cases", default="all", help="comma-separated indexes into the case list (see below)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped by `timeout`: clean up as on Ctrl-C
    size, rate = parse_size(args.size) or 0, float(parse_size(args.rate) or 0)
    cases = [(case, case.conf.name) for case in CASES]
    if args.cases != "all":
        cases = [cases[int(i)] for i in args.cases.split(",")]
    if args.old_config:
        cases.insert(0, (Case(args.old_config.resolve(), "llmlb"), f"old: {args.old_config.name}"))
    work = Path(tempfile.mkdtemp(prefix="modelfs-bench-fleet-"))
    rows = []
    try:
        models = work / "models"
        make_gguf_of_size(models / NAME / "model.gguf", size)
        size = (models / NAME / "model.gguf").stat().st_size
        sha = sha256_of(models / NAME / "model.gguf")
        for i, (case, label) in enumerate(cases):
            rows.append(run_case(work / f"case{i}", models, sha, size, case, args.nodes, rate, label))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
