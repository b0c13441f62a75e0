"""The mount helper's form: `modelfs SOURCE MOUNTPOINT -o OPTIONS`, which is how mount(8) runs
a `fuse.modelfs` filesystem (an /etc/fstab line, `mount -t fuse.modelfs ...`), turned into the
argv of `modelfs mount`, so both forms share one parser, one set of defaults and one validation.

What arrives here (measured on Debian 12: util-linux 2.38 mount(8), fuse3 3.14 mount.fuse3):
mount(8) keeps its own options (`_netdev`, `nofail`, `noauto`, `auto`, `user`, `users`,
`owner`, `group`, `defaults`, `comment=`, `x-*`, `X-*`) to itself, turns the VFS flags it knows
into flags and back (`user` becomes `noexec,nosuid,nodev`), sends `rw` for every mount that does
not say `ro`, and runs /sbin/mount.fuse3 without the caller's PATH and HOME. mount.fuse3
handles `setuid=USER` and `drop_privileges` itself, drops the options above once more, appends
`dev,suid` unless `nodev`/`nosuid` were given, and runs `modelfs SOURCE MOUNTPOINT -o OPTS`
through /bin/sh with the default PATH (hence /usr/local/bin/modelfs, see scripts/setup); with
`drop_privileges` the mount point arrives as /dev/fd/N. Quoted values (`cache="/a,b"`) arrive
with their quotes.
"""

from __future__ import annotations

import re
import sys

from modelfs.cache.errors import ModelfsError

# modelfs options that take a value, each `modelfs mount --NAME-WITH-DASHES VALUE`
VALUED = ("cache", "cache_max", "min_free", "max_inflight", "max_fetches", "prefetch",
          "readahead", "read_timeout", "fetch_unit", "model")
FLAGS = ("allow_other",)

# Accepted and ignored. The mount is always read-only, nosuid and nodev, and its files have no
# execute bits: `rw` cannot be refused, since mount(8) sends it for every mount without `ro`,
# and mount.fuse3 adds `dev,suid` to every mount by root. mount(8)'s own options are listed for
# a direct call (mount(8) never passes them on).
IGNORED = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
           "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
           "diratime", "nodiratime", "sync", "async", "dirsync", "defaults", "auto", "noauto",
           "user", "nouser", "users", "owner", "group", "_netdev", "nofail"}
IGNORED_PREFIXES = ("x-", "X-", "comment=")


class MountOptionError(ModelfsError):
    pass


# mount(8)'s exit codes for its helpers: 1 incorrect invocation, 8 user interrupt, 32 mount
# failure (the CLI's: 2 usage, 130 interrupted, 1 any other error)
_HELPER_CODES = {0: 0, 2: 1, 130: 8}


def mount_helper(parser, argv: list[str], run) -> int:
    """`modelfs SOURCE MOUNTPOINT -o OPTIONS` as `modelfs mount` (in the background: mount(8)
    waits for its helper, and the mount is up when that returns) with mount(8)'s exit codes.
    `run` runs parsed arguments as the CLI does."""
    def refuse(message: str):
        raise MountOptionError(explain(message))

    parser.commands["mount"].error = refuse
    try:
        args = parser.parse_args(mount_argv(argv))
    except MountOptionError as exc:
        print(f"modelfs: error: {exc}", file=sys.stderr)
        return 1
    return _HELPER_CODES.get(run(args), 32)


def split_options(text: str) -> list[str]:
    """`a=1,b="x,y",c` -> ['a=1', 'b=x,y', 'c']: commas inside double quotes do not split."""
    out, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise MountOptionError(f"unbalanced quote in mount options {text!r}")
    out.append("".join(current))
    return [opt for opt in out if opt]


def mount_argv(argv: list[str]) -> list[str]:
    """`SOURCE MOUNTPOINT [-o OPTS]...` -> the argv of `modelfs mount`. SOURCE is the registry
    (`http://127.0.0.1:8080`, `registry.ollama.ai`: a host alone means https)."""
    positional, options = [], []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            value = next(it, None)
            if value is None:
                raise MountOptionError("-o needs a value")
            options += split_options(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options += split_options(arg[2:])
        elif arg.startswith("-"):
            raise MountOptionError(f"unknown argument {arg!r} (usage: modelfs SOURCE "
                                   f"MOUNTPOINT [-o OPTION[,OPTION...]])")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise MountOptionError("usage: modelfs SOURCE MOUNTPOINT [-o OPTION[,OPTION...]] "
                               "(SOURCE is the registry, e.g. registry.ollama.ai)")
    source, mountpoint = positional
    if re.fullmatch(r"/dev/fd/\d+", mountpoint):
        # (mount.fuse3 has mounted it already and we may not unmount it: it stays dead)
        raise MountOptionError("drop_privileges is not supported: modelfs mounts the "
                               "filesystem itself (setuid=USER runs it as a user); umount the "
                               "dead mount mount.fuse3 left")
    out = ["mount", mountpoint, "--registry", source]
    unknown = []
    for opt in options:
        key, eq, value = opt.partition("=")
        name = key.replace("-", "_")
        if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if name in VALUED:
            if not eq or not value:
                raise MountOptionError(f"mount option {key} needs a value ({key}=...)")
            out += [_flag(name), value]
        elif name in FLAGS:
            if eq:
                raise MountOptionError(f"mount option {key} takes no value")
            out.append(_flag(name))
        else:
            unknown.append(opt)
    if unknown:
        raise MountOptionError(
            f"unknown mount option{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
            f"(modelfs takes {', '.join(n + '=' for n in VALUED)}, {', '.join(FLAGS)})")
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def explain(message: str) -> str:
    """An argparse complaint about `--cache-max` as one about the mount option `cache_max`."""
    return re.sub(r"argument --([a-z-]+)",
                  lambda m: f"mount option {m.group(1).replace('-', '_')}", message)
