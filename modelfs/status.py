"""`modelfs status` and `modelfs prefetch`: tools that talk to a running daemon through its mount.

They never guess from disk: everything comes from the daemon's extended attributes (`user.modelfs.*` on the
root and on each model file), as CernVM-FS exposes its state, so what they show is what the daemon believes. They
read JSON (`user.modelfs.status`, `.entries`, `.state`; see `states`), never the text the daemon writes for people.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import names
from .states import COMPLETE, DOWNLOADING, FAILED, VERIFYING, describe

_libc = ctypes.CDLL(None, use_errno=True)
XATTR_SIZE_MAX = 65536


def _big_xattr(path: Path, key: str) -> bytes:
    """getxattr with a 64 KiB buffer at once: os.getxattr first tries 128 bytes, so a large value costs the
    daemon two requests (and two listings)."""
    buffer = ctypes.create_string_buffer(XATTR_SIZE_MAX)
    size = _libc.getxattr(os.fsencode(path), key.encode(), buffer, XATTR_SIZE_MAX)
    if size < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buffer.raw[:size]


def _xattr(path: Path, key: str) -> str:
    try:
        return os.getxattr(path, f"user.modelfs.{key}").decode()
    except OSError:
        return ""


def model_state(path: Path) -> dict[str, Any]:
    """A model's state (`user.modelfs.state`, JSON); `{}` if the daemon cannot say (then the caller says why)."""
    try:
        state = json.loads(_big_xattr(path, "user.modelfs.state"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def read_status(mountpoint: Path) -> dict[str, Any]:
    """The daemon's state and every model it lists, with source, size, progress and backing path.

    One `user.modelfs.entries` xattr per directory describes all its models, so 15,000 models cost a few hundred
    requests to the daemon, not three per model. A directory too large for one xattr value (64 KiB) is read
    entry by entry instead.
    """
    try:
        raw = _big_xattr(mountpoint, "user.modelfs.status").decode()
    except OSError:
        raw = ""
    if not raw:
        raise RuntimeError(f"{mountpoint} is not a running modelfs mount")
    state: dict[str, Any] = json.loads(raw)
    if state.get("state") == "failed":  # the supervisor gave up: it answers this attribute and nothing else
        return state
    models: list[dict[str, Any]] = []
    pending = [mountpoint]
    while pending:
        directory = pending.pop()
        try:
            entries = json.loads(_big_xattr(directory, "user.modelfs.entries"))
        except OSError:
            models.extend(_read_one_by_one(mountpoint, directory, pending))
            continue
        for name, model in entries["models"].items():
            models.append({"name": name, **model})
        pending.extend(directory / child for child in entries["dirs"])
    state["models"] = sorted(models, key=lambda model: str(model["name"]))
    return state


def _read_one_by_one(mountpoint: Path, directory: Path, pending: list[Path]) -> list[dict[str, Any]]:
    models = []
    with os.scandir(directory) as scan:
        for entry in scan:
            path = Path(entry.path)
            if entry.is_dir():
                pending.append(path)
                continue
            name = path.relative_to(mountpoint).as_posix()[: -len(names.SUFFIX)]
            try:
                size = path.stat().st_size
            except OSError:
                continue
            models.append({"name": name, "source": _xattr(path, "source"), "size": size,
                           "path": _xattr(path, "path"), **model_state(path)})
    return models


def cmd_status(args: argparse.Namespace) -> int:
    try:
        state = read_status(args.mountpoint)
    except (RuntimeError, OSError) as exc:
        print(f"modelfs: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    if state.get("state") == "failed":
        print(f"modelfs at {args.mountpoint}: FAILED, every request gets EIO: {state.get('reason', '?')}")
        print(f"supervisor pid {state.get('supervisor_pid')}: `modelfs restart {args.mountpoint}` tries again")
        return 1
    store = state["store"]
    limit = f" of {store['max_bytes'] / 1e9:.1f} GB" if store.get("max_bytes") else ""
    print(f"modelfs {state['version']} at {args.mountpoint}")
    print(f"daemon  {_daemon_line(state)}")
    print(f"store   {store['path']}: {store['usage_bytes'] / 1e9:.2f} GB used{limit}")
    passthrough = state.get("passthrough")
    if isinstance(passthrough, dict):
        mode = "active" if passthrough["active"] else "inactive, daemon read path"
        print(f"io      passthrough {mode} (mode {passthrough['mode']}): {passthrough['reason']}")
    for shared in state["shared"]:
        health = "ok" if shared["available"] else f"UNAVAILABLE ({shared['reason']})"
        print(f"shared  {shared['path']}: {health}")
    for router in state["routers"]:
        print(f"router  {router['url']}: last {router['last_status']}")
    print()
    print(f"{'MODEL':40} {'SOURCE':7} {'SIZE':>10}  STATE / PATH")
    for model in state["models"]:
        print(f"{model['name']:40} {model['source']:7} {model['size'] / 1e9:9.2f}G  {describe(model)}  "
              f"{model['path']}")
    return 0


def _daemon_line(state: dict[str, Any]) -> str:
    """`pid 123 (connection held by supervisor pid 100), 2 restarts, last pause 0.16 s`."""
    held = state.get("held_by") or "nothing"
    holder = f"{held} pid {state['supervisor_pid']}" if state.get("supervisor_pid") else held
    line = f"pid {state.get('pid')} (connection held by {holder}), {state.get('restarts', 0)} restarts"
    pause = state.get("last_restart_pause_s")
    return line + (f", last pause {pause:.2f} s" if isinstance(pause, (int, float)) else "")


def cmd_prefetch(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.names:
        error = prefetch(args.mount, name)
        if error:
            print(f"modelfs: prefetch of {name} failed: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def prefetch(mountpoint: Path, name: str) -> str | None:
    """Download `name` through the mount and wait until it is promoted; None on success, else the reason.

    The open starts the download (or joins it); from then on the daemon's state (JSON) says how far it is. Parts
    may arrive in any order, so no single byte read would say that all of them are there.
    """
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
            state = _wait_for_promotion(path)
        finally:
            done.set()
            bar.join()
    finally:
        os.close(fd)
    if state.get("state") == FAILED:
        return f"{os.strerror(int(state.get('errno') or 0))} ({state.get('reason')})"
    if state.get("state") != COMPLETE:
        return f"the download ended {describe(state)}" if state else "the daemon no longer knows the model"
    if sys.stderr.isatty():
        return None
    print(f"{name}: complete, {size} bytes", file=sys.stderr)
    return None


def _wait_for_promotion(path: Path) -> dict[str, Any]:
    """Wait until the daemon's state is neither `downloading` nor `verifying` (every byte is there but the digest is
    checked and the file renamed into the store): `complete` (promoted), `failed`, or anything unexpected."""
    delay = 0.01
    while True:
        state = model_state(path)
        if state.get("state") not in (DOWNLOADING, VERIFYING):
            return state
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _show_progress(path: Path, name: str, size: int, done: threading.Event) -> None:
    """A progress bar (bytes, rate, ETA) from the daemon's state; silent when not on a terminal."""
    if not sys.stderr.isatty():
        return
    from tqdm import tqdm

    with tqdm(total=size, unit="B", unit_scale=True, desc=name, file=sys.stderr) as bar:
        while not done.wait(0.2):
            state = model_state(path)
            current = size if state.get("state") == COMPLETE else state.get("bytes")
            if isinstance(current, int):
                bar.update(current - bar.n)
        bar.update(size - bar.n)


__all__ = ["cmd_status", "cmd_prefetch", "read_status", "prefetch"]
