"""The fstab mount helper: `mount /models` for an fstab line of type `fuse.modelfs`.

For type `fuse.modelfs`, mount(8) runs `/sbin/mount.fuse.modelfs SOURCE MOUNTPOINT [-sfnv] [-N NS] -o OPTIONS
[-t TYPE]` (see "External helpers" in mount(8)); `/sbin/mount.fuse.modelfs` is a symlink to the console script of
the same name that pip installs next to `modelfs`. The helper turns the options into `modelfs mount` flags and runs
the very same code as `modelfs mount MOUNTPOINT ...` in background mode: it returns once the mount is live (exit 0)
or with the daemon's one-line reason (exit 32, mount(8)'s "mount failure").

Options (commas separate options, so lists use other separators):

    config=FILE                    --config FILE
    store=DIR                      --store DIR
    shared_dirs=DIR1:DIR2          --shared DIR1 --shared DIR2  (colon-separated, like PATH; repeatable)
    router=URL1|URL2               --router URL1 --router URL2  (`|` never appears unescaped in a URL; repeatable)
    allow_other, debug             --allow-other, --debug
    shared_timeout=S, connect_timeout=S, read_timeout=S, retries=N, store_max_size=SIZE, log_file=FILE
                                   the flags of the same names

`shared=` is accepted too when the helper is run by hand, but mount(8) never passes it on: libmount takes
`shared` for its mount-propagation flag and drops it. Generic mount options (rw, ro, defaults, auto, noauto, user,
nofail, _netdev, x-systemd.*, nodev, nosuid, noexec, atime options, ...) are ignored: modelfs is always read-only,
nodev and nosuid. `router_token` is refused: /etc/fstab is world-readable; put the key in the config file (mode
0600) or MODELFS_ROUTER_TOKEN. Any other option is an error (exit 1), unless mount runs with -s (sloppy).
"""

from __future__ import annotations

import argparse
import sys

PROG = "mount.fuse.modelfs"

#: Options with a value that map one-to-one onto a `modelfs mount` flag.
VALUE_FLAGS = {
    "config": "--config",
    "store": "--store",
    "shared_timeout": "--shared-timeout",
    "connect_timeout": "--connect-timeout",
    "read_timeout": "--read-timeout",
    "retries": "--retries",
    "store_max_size": "--store-max-size",
    "log_file": "--log-file",
}
#: Options whose value is a list: (separator, flag repeated once per item).
LIST_FLAGS = {
    "shared_dirs": (":", "--shared"),
    "shared": (":", "--shared"),
    "router": ("|", "--router"),
}
#: Options without a value.
BOOL_FLAGS = {"allow_other": "--allow-other", "debug": "--debug"}

#: What the error message lists (`shared` works only by hand: mount(8) swallows it).
KNOWN = sorted({*VALUE_FLAGS, *LIST_FLAGS, *BOOL_FLAGS} - {"shared"})

#: Generic mount(8) options that reach helpers and mean nothing (or nothing more) to modelfs.
IGNORED = {
    "rw", "ro", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev",
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync", "silent", "loud",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
    "diratime", "nodiratime", "mand", "nomand", "iversion", "noiversion",
    "default_permissions",  # modelfs always mounts with it
}
IGNORED_PREFIXES = ("x-", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=")


class OptionError(Exception):
    """An option modelfs cannot take; the message names it."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="fstab mount helper for modelfs: mount(8) runs it for type fuse.modelfs. "
        "Example fstab line: modelfs /models fuse.modelfs config=/etc/modelfs/config.toml,allow_other,_netdev 0 0",
    )
    parser.add_argument("source", help="ignored (write `modelfs` in fstab)")
    parser.add_argument("mountpoint", help="where to mount")
    parser.add_argument("-o", dest="options", action="append", default=[], help="comma-separated options")
    parser.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options (mount -s)")
    parser.add_argument("-f", dest="fake", action="store_true", help="check the options, mount nothing (mount -f)")
    parser.add_argument("-n", dest="nomtab", action="store_true", help="ignored (no mtab to write)")
    parser.add_argument("-v", dest="verbose", action="store_true", help="print the modelfs command line")
    parser.add_argument("-N", dest="namespace", help="not supported")
    parser.add_argument("-t", dest="type", help="ignored (fuse.modelfs)")
    return parser


def split_options(texts: list[str]) -> list[str]:
    return [option.strip() for text in texts for option in text.split(",") if option.strip()]


def to_flags(options: list[str], sloppy: bool = False) -> tuple[list[str], list[str]]:
    """(`modelfs mount` flags, ignored unknown options) for the mount options; OptionError on a bad one."""
    flags: list[str] = []
    unknown: list[str] = []
    for option in options:
        key, has_value, value = option.partition("=")
        if option in IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        if key == "router_token":
            raise OptionError("router_token does not belong in /etc/fstab, which everyone can read: put it in the "
                              "config file (mode 0600, config=FILE) or MODELFS_ROUTER_TOKEN")
        if key in BOOL_FLAGS:
            if has_value:
                raise OptionError(f"option {key!r} takes no value")
            flags.append(BOOL_FLAGS[key])
        elif key in VALUE_FLAGS or key in LIST_FLAGS:
            if not value:
                raise OptionError(f"option {key!r} needs a value ({key}=...)")
            if key in VALUE_FLAGS:
                flags += [VALUE_FLAGS[key], value]
            else:
                separator, flag = LIST_FLAGS[key]
                items = [item.strip() for item in value.split(separator) if item.strip()]
                if not items:
                    raise OptionError(f"option {key!r} needs a value ({key}=...)")
                for item in items:
                    flags += [flag, item]
        elif sloppy:
            unknown.append(option)
        else:
            raise OptionError(
                f"unknown option {option!r} (known: {', '.join(sorted(KNOWN))}; "
                "generic mount options are ignored)"
            )
    return flags, unknown


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.namespace:
        print(f"{PROG}: mounting in another namespace (-N) is not supported", file=sys.stderr)
        return 1
    try:
        flags, unknown = to_flags(split_options(args.options), sloppy=args.sloppy)
    except OptionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    for option in unknown:
        print(f"{PROG}: ignoring unknown option {option!r} (sloppy mount)", file=sys.stderr)
    command = ["mount", args.mountpoint, *flags]
    if args.verbose or args.fake:
        print(f"{PROG}: modelfs {' '.join(command)}")
    if args.fake:
        return 0
    from .cli import main as modelfs_main

    try:
        status = modelfs_main(command)
    except SystemExit as exc:  # argparse rejected a value, e.g. retries=many; it printed why
        return 1 if exc.code else 0
    # mount(8)'s exit codes: 1 = bad invocation or options (modelfs says 2 for a bad setting), 32 = mount failure.
    return {0: 0, 2: 1}.get(status, 32)


if __name__ == "__main__":
    sys.exit(main())
