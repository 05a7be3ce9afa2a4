"""Soak under faults (issue 13): many reader processes verify every byte while the router and the shared
directory misbehave in bursts.

    .venv/bin/python -m tests.soak [--duration 180] [--readers 64] [--models 24] [--json OUT]
    .venv/bin/python -m tests.soak --quick       # 25 s, 16 readers, small models: what tests/test_soak.py runs

From the repository root, as root (FUSE, a private loopback sshd). It makes, in a temporary directory (under
--workdir if given; removed at the end):
- models with deterministic content (a per-model 65,521-byte block repeated, starting with the GGUF magic), a
  third each in the store (local), on an sshfs share over a loopback sshd (shared; half of them also on the
  router, so a hung share falls back to a download, the other half only there) and on the router only, the
  router ones becoming readable one after another, each just as a fault burst begins;
- the test router (tests/support/router_server.py, range flavour, throttled) and one modelfs mount with
  `--metrics`;
- reader processes (this file with `--reader`), each looping until the deadline: pick a model it may read, open
  it, pread random ranges, compare every byte with the known content, and time every call against a bound;
- a fault driver: router bursts in turn (every blob request 500; every blob request stalls; bodies cut after a
  few hundred KiB, like a reset; the model list 500), and sshfs SIGSTOP/SIGCONT bursts.
It reports bytes read, wrong bytes, hung calls (past the bound, or a reader still blocked at the end), errors
by errno, the daemon's RSS over time, and downloads per model (daemon log and router log).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the readers import nothing heavy: 64 of them start at once
    from tests.support.router import RouterProcess
    from tests.support.sshfs import SshfsMount

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 65_521  # prime: a misplaced range never matches by accident
MIB = 1 << 20


def block_of(name: str) -> bytes:
    return b"GGUF" + random.Random(name).randbytes(BLOCK - 4)


def content(name: str, size: int) -> bytes:
    block = block_of(name)
    return (block * (size // BLOCK + 1))[:size]


def write(root: Path, name: str, size: int) -> None:
    path = root / name / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content(name, size))


# The reader process.


def reader(spec: dict[str, Any]) -> dict[str, Any]:
    """Read until the deadline; every byte checked; every call timed. Returns the tallies."""
    rng = random.Random(spec["seed"])
    mnt = Path(spec["mount"])
    bound = spec["bound"]
    tallies: dict[str, Any] = {"bytes": 0, "wrong": 0, "hung": 0, "reads": 0, "opens": 0, "errors": Counter(),
                               "slowest": 0.0, "wrong_reads": [], "short": 0, "slow_calls": []}
    max_read = spec["max_read"]
    while time.time() < spec["deadline"]:
        now = time.time()
        ready = [m for m in spec["models"] if m["after"] <= now]
        model = rng.choice(ready)
        name, size = model["name"], model["size"]
        started = time.monotonic()
        try:
            fd = os.open(mnt / f"{name}.gguf", os.O_RDONLY)
        except OSError as exc:
            tallies["errors"][f"open {errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1
            time.sleep(0.05)
            continue
        finally:
            note(tallies, "open", model, time.monotonic() - started, bound)
        tallies["opens"] += 1
        block = block_of(name)
        repeated = block * (max_read // BLOCK + 2)
        try:
            for _ in range(rng.randint(1, 8)):
                length = rng.randint(1, max_read)
                offset = rng.randrange(0, size)
                started = time.monotonic()
                try:
                    data = os.pread(fd, length, offset)
                except OSError as exc:
                    tallies["errors"][f"read {errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1
                    break
                finally:
                    note(tallies, f"pread {length}@{offset}", model, time.monotonic() - started, bound)
                expected_length = min(length, size - offset)
                start = offset % BLOCK
                expected = repeated[start:start + len(data)]
                tallies["reads"] += 1
                tallies["bytes"] += len(data)
                if data != expected or len(data) > expected_length:
                    tallies["wrong"] += sum(a != b for a, b in zip(data, expected, strict=True)) + max(
                        0, len(data) - expected_length)
                    if len(tallies["wrong_reads"]) < 5:
                        tallies["wrong_reads"].append({"model": name, "offset": offset, "asked": length,
                                                       "got": len(data)})
                if len(data) < expected_length:
                    # A read may return fewer bytes than asked when a later part of the range fails (the kernel
                    # returns what it has); the next read then says why. Count it, and ask.
                    tallies["short"] += 1
                    try:
                        os.pread(fd, 1, offset + len(data))
                        tallies["errors"]["short read, then a read OK"] += 1
                    except OSError as exc:
                        tallies["errors"][f"short read, then {errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1
                    break
        finally:
            os.close(fd)
    tallies["errors"] = dict(tallies["errors"])
    return tallies


def note(tallies: dict[str, Any], op: str, model: dict[str, Any], took: float, bound: float) -> None:
    """Time of one call: the slowest, those past the bound (hung), and the first few over 5 s, to explain them."""
    tallies["slowest"] = max(tallies["slowest"], took)
    tallies["hung"] += took > bound
    if took > 5 and len(tallies["slow_calls"]) < 10:
        tallies["slow_calls"].append({"op": op, "model": model["name"], "size": model["size"],
                                      "seconds": round(took, 2), "ended_at": round(time.time(), 1)})


# The driver.


def fault_driver(router: RouterProcess, sshfs: SshfsMount, stop: threading.Event, log: list[str], t0: float,
                 period: float) -> None:
    """Router bursts in turn, and sshfs stop/continue bursts, until `stop`."""
    bursts = [("500", {"status": 500}), ("stall", {"hang": True}), ("reset", {"truncate_after": 300_000}),
              ("list 500", {"list_status": 500})]
    clear = {"status": None, "hang": None, "truncate_after": None, "list_status": None}
    turn = 0
    while not stop.wait(period):
        kind, fault = bursts[turn % len(bursts)]
        router.control(**fault)
        log.append(f"{time.monotonic() - t0:6.1f}s router {kind}")
        stopped = turn % 2 == 0
        if stopped:
            sshfs.stop()
            log.append(f"{time.monotonic() - t0:6.1f}s sshfs STOP")
        stop.wait(min(2.0, period / 2))
        router.control(**clear)
        if stopped:
            sshfs.cont()
            log.append(f"{time.monotonic() - t0:6.1f}s sshfs CONT")
        turn += 1


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "router")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """One soak; every process, mount and file it made is gone when it returns or raises."""
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="modelfs-soak-", dir=args.workdir))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        return _soak(args, work, stack)


def _soak(args: argparse.Namespace, work: Path, stack: ExitStack) -> dict[str, Any]:
    from tests.support.mount import Mount
    from tests.support.procs import free_port, proc_status
    from tests.support.router import RouterProcess
    from tests.support.sshfs import Sshd, SshfsMount

    store, remote, routed, mnt, share = (work / d for d in ("store", "remote", "router", "mnt", "share"))
    for d in (store, remote, routed, share):
        d.mkdir(parents=True)
    rng = random.Random(1)
    models = []
    third = args.models // 3
    for i in range(args.models):
        kind = ("local", "shared", "router")[min(i // third, 2)]
        name = f"{kind}/m{i}"
        size = rng.randint(args.min_size, args.max_size)
        models.append({"name": name, "size": size, "kind": kind, "after": 0.0})
        if kind == "local":
            write(store, name, size)
        if kind == "shared":
            write(remote, name, size)
        if kind == "router" or (kind == "shared" and i % 2 == 0):  # half the shared ones have a fallback
            write(routed, name, size)
    router = stack.enter_context(RouterProcess(routed, flavour="range"))
    router.control(rate=args.rate)
    sshd = stack.enter_context(Sshd())
    sshfs = stack.enter_context(SshfsMount(sshd, str(remote), str(share)))
    port = free_port()
    # --no-supervisor: the process started serves the mount, so its RSS is the daemon's.
    m = stack.enter_context(Mount(mnt, store, ["--no-supervisor", "--shared", str(share), "--router", router.url,
                                               "--shared-timeout", "1", "--read-timeout", "3", "--connect-timeout",
                                               "2", "--retries", "6", "--metrics", f"127.0.0.1:{port}"],
                                  work / "modelfs.log"))
    connection = Path(f"/sys/fs/fuse/connections/{os.minor(os.stat(mnt).st_dev)}")  # needs fusectl mounted
    if args.max_background:  # a lever: the kernel's limit of background (read-ahead) requests in flight
        (connection / "max_background").write_text(f"{args.max_background}\n")
        (connection / "congestion_threshold").write_text(f"{args.max_background * 3 // 4}\n")
    max_background = int((connection / "max_background").read_text()) if connection.exists() else None
    waiting: list[int] = []
    t0 = time.time()
    deadline = t0 + args.duration
    router_models = [model for model in models if model["kind"] == "router"]
    for k, model in enumerate(router_models):
        # One after another through the first 80 % of the run, each just after a fault burst begins (the driver
        # starts one every fault_period seconds), so that its download meets that fault.
        at = 0.8 * args.duration * k / max(len(router_models), 1)
        model["after"] = t0 + (math.ceil(at / args.fault_period) * args.fault_period + 0.2 if k else 0.0)
    spec = {"mount": str(mnt), "models": models, "deadline": deadline, "bound": args.bound,
            "max_read": args.max_read}
    readers = []
    for n in range(args.readers):
        readers.append(subprocess.Popen([sys.executable, "-m", "tests.soak", "--reader",
                                         json.dumps({**spec, "seed": n})], stdout=subprocess.PIPE, text=True,
                                        cwd=ROOT))
    stack.callback(kill_all, readers)
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    faults: list[str] = []
    driver = threading.Thread(target=fault_driver, args=(router, sshfs, stop, faults, time.monotonic(),
                                                         args.fault_period), daemon=True)
    driver.start()
    while time.time() < deadline:
        rss.append((time.time() - t0, proc_status(m.pid, "VmRSS")))
        if connection.exists():
            waiting.append(int((connection / "waiting").read_text()))
        time.sleep(1.0)
    stop.set()
    driver.join(timeout=30)
    router.control(status=None, hang=None, truncate_after=None, list_status=None)
    if sshfs.stopped:
        sshfs.cont()
    totals: dict[str, Any] = {"bytes": 0, "wrong": 0, "hung": 0, "reads": 0, "opens": 0, "short": 0,
                              "slowest": 0.0}
    errors: Counter[str] = Counter()
    blocked = 0
    wrong_reads: list[dict[str, Any]] = []
    slow_calls: list[dict[str, Any]] = []
    for p in readers:
        try:
            out, _ = p.communicate(timeout=args.bound + 15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            blocked += 1
            continue
        result = json.loads(out.strip().splitlines()[-1])
        for key in ("bytes", "wrong", "hung", "reads", "opens", "short"):
            totals[key] += result[key]
        totals["slowest"] = max(totals["slowest"], result["slowest"])
        errors.update(result["errors"])
        wrong_reads.extend(result["wrong_reads"])
        slow_calls.extend(dict(call, ended_at=round(call["ended_at"] - t0, 1)) for call in result["slow_calls"])
    rss.append((time.time() - t0, proc_status(m.pid, "VmRSS")))
    metrics = scrape(port)
    stats = router.stats()
    m.stop()
    log = (work / "modelfs.log").read_text(errors="replace")
    started = Counter(re.findall(r"open (\S+): starting a download", log))
    failed = Counter(re.findall(r"download of (\S+) failed", log))
    gets_from_zero = Counter(q["name"] for q in stats["requests"] if q["method"] == "GET" and q["name"]
                             and q["status"] == 200)
    sent = stats["bytes_sent"]
    downloads = {model["name"]: {"started": started.get(model["name"], 0), "failed": failed.get(model["name"], 0),
                                 "router_200_bodies": gets_from_zero.get(model["name"], 0),
                                 "router_bytes_per_size": round(sent.get(model["name"], 0) / model["size"], 2)}
                 for model in models if started.get(model["name"]) or model["kind"] == "router"}
    tracebacks = log.count("Traceback")
    return {
        "duration_s": args.duration, "readers": args.readers, "models": {k: sum(x["kind"] == k for x in models)
                                                                         for k in ("local", "shared", "router")},
        "bytes_read": totals["bytes"], "reads": totals["reads"], "opens": totals["opens"],
        "wrong_bytes": totals["wrong"], "wrong_reads": wrong_reads[:20], "short_reads": totals["short"],
        "hung": totals["hung"] + blocked, "readers_blocked_at_end": blocked,
        "slowest_call_s": round(totals["slowest"], 2), "bound_s": args.bound,
        "calls_over_5s": sorted(slow_calls, key=lambda call: -call["seconds"])[:20],
        "slow_calls_by_kind": dict(Counter(call["model"].split("/")[0] for call in slow_calls)),
        "fuse_max_background": max_background,
        "fuse_waiting_max": max(waiting, default=None),
        "errors": dict(sorted(errors.items())), "rss_mib": [(round(t), r // MIB) for t, r in rss],
        "downloads": downloads, "faults": faults, "daemon_tracebacks": tracebacks,
        "metrics": {k: v for k, v in metrics.items() if "_created" not in k and k.startswith((
            "modelfs_opens", "modelfs_downloads", "modelfs_router_requests", "modelfs_shared_outages",
            "modelfs_misses", "modelfs_daemon"))},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of reading (default 180)")
    parser.add_argument("--readers", type=int, default=64)
    parser.add_argument("--models", type=int, default=24)
    parser.add_argument("--min-size", type=int, default=4 * MIB)
    parser.add_argument("--max-size", type=int, default=16 * MIB)
    parser.add_argument("--max-read", type=int, default=256 * 1024)
    parser.add_argument("--rate", type=int, default=2 * MIB, help="router bytes/s per connection (default 2 MiB/s, "
                        "so downloads overlap the fault bursts)")
    parser.add_argument("--bound", type=float, default=20.0, help="seconds after which a call counts as hung")
    parser.add_argument("--fault-period", type=float, default=5.0, help="seconds between fault bursts")
    parser.add_argument("--quick", action="store_true", help="25 s, 16 readers, 1-3 MiB models")
    parser.add_argument("--max-background", type=int, help="set the FUSE connection's max_background (fusectl "
                        "must be mounted: mount -t fusectl fusectl /sys/fs/fuse/connections); a lever, not a fix")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--workdir", type=Path, help="where to make the soak's temporary directory (default: the "
                        "system's temporary directory)")
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader:
        print(json.dumps(reader(json.loads(args.reader))))
        return 0
    if args.quick:
        args.duration, args.readers, args.min_size, args.max_size = 25.0, 16, MIB, 3 * MIB
        args.fault_period = 3.0
    if os.geteuid() != 0:
        print("tests/soak.py runs as root (FUSE, sshd)", file=sys.stderr)
        return 2
    report = soak(args)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    ok = report["wrong_bytes"] == 0 and report["hung"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
