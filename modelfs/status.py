"""`modelfs status` and `modelfs prefetch`: tools that talk to a running daemon through its mount.

They never guess from disk: everything comes from the daemon's extended attributes (`user.modelfs.*` on the
root and on each model file), as CernVM-FS exposes its state, so what they show is what the daemon believes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import names


def _xattr(path: Path, key: str) -> str:
    try:
        return os.getxattr(path, f"user.modelfs.{key}").decode()
    except OSError:
        return ""


def read_status(mountpoint: Path) -> dict[str, Any]:
    """The daemon's state and every model it lists, with source, size, progress and backing path."""
    raw = _xattr(mountpoint, "status")
    if not raw:
        raise RuntimeError(f"{mountpoint} is not a running modelfs mount")
    state: dict[str, Any] = json.loads(raw)
    models = []
    for dirpath, _dirs, files in os.walk(mountpoint):
        for filename in sorted(files):
            path = Path(dirpath) / filename
            name = path.relative_to(mountpoint).as_posix()[: -len(names.SUFFIX)]
            try:
                size = path.stat().st_size
            except OSError:
                continue
            models.append({"name": name, "source": _xattr(path, "source"), "size": size,
                           "state": _xattr(path, "progress"), "path": _xattr(path, "path")})
    state["models"] = models
    return state


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state = read_status(args.mountpoint)
    except (RuntimeError, OSError) as exc:
        print(f"modelfs: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    store = state["store"]
    limit = f" of {store['max_bytes'] / 1e9:.1f} GB" if store.get("max_bytes") else ""
    print(f"modelfs {state['version']} at {args.mountpoint}")
    print(f"store   {store['path']}: {store['usage_bytes'] / 1e9:.2f} GB used{limit}")
    for shared in state["shared"]:
        health = "ok" if shared["available"] else f"UNAVAILABLE ({shared['reason']})"
        print(f"shared  {shared['path']}: {health}")
    for router in state["routers"]:
        print(f"router  {router['url']}: last {router['last_status']}")
    print()
    print(f"{'MODEL':40} {'SOURCE':7} {'SIZE':>10}  STATE / PATH")
    for model in state["models"]:
        print(f"{model['name']:40} {model['source']:7} {model['size'] / 1e9:9.2f}G  {model['state']}  {model['path']}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.names:
        error = prefetch(args.mount, name)
        if error:
            print(f"modelfs: prefetch of {name} failed: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def prefetch(mountpoint: Path, name: str) -> str | None:
    """Download `name` through the mount and wait for it; None on success, else the reason."""
    try:
        names.validate(name)
    except names.InvalidName as exc:
        return str(exc)
    path = mountpoint / f"{name}{names.SUFFIX}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        size = os.fstat(fd).st_size
        done = threading.Event()
        bar = threading.Thread(target=_show_progress, args=(path, name, size, done), daemon=True)
        bar.start()
        try:
            # Waits until the download has written the last byte: it is sequential, so that means all of it.
            os.pread(fd, 1, max(size - 1, 0))
        except OSError as exc:
            detail = _xattr(path, "progress")
            return f"{exc.strerror}" + (f" ({detail})" if detail.startswith("failed") else "")
        finally:
            done.set()
            bar.join()
    finally:
        os.close(fd)
    # The last byte is readable as soon as it is written, before the download is verified and moved into the
    # store; the daemon says "downloading" until then. Wait for that, so the model is in the store on return.
    state = _xattr(path, "progress")
    while state.startswith("downloading"):
        time.sleep(0.02)
        state = _xattr(path, "progress")
    if state != "complete":
        return state or f"{path}: no download state"
    if sys.stderr.isatty():
        return None
    print(f"{name}: complete, {size} bytes", file=sys.stderr)
    return None


def _show_progress(path: Path, name: str, size: int, done: threading.Event) -> None:
    """A progress bar (bytes, rate, ETA) from the daemon's progress xattr; silent when not on a terminal."""
    if not sys.stderr.isatty():
        return
    from tqdm import tqdm

    with tqdm(total=size, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
        while not done.wait(0.2):
            state = _xattr(path, "progress")
            current = size if state == "complete" else _bytes_of(state)
            if current is not None:
                bar.update(current - bar.n)
        bar.update(size - bar.n)


def _bytes_of(state: str) -> int | None:
    """`downloading 12.0% (123/1024 bytes) at ...` → 123."""
    if "(" not in state:
        return None
    try:
        return int(state.split("(", 1)[1].split("/", 1)[0])
    except ValueError:
        return None


__all__ = ["cmd_status", "cmd_prefetch", "read_status", "prefetch"]
