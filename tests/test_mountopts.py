"""The mount helper form (`modelfs SOURCE MOUNTPOINT -o OPTIONS`) turned into `modelfs mount`
arguments, and refused with mount(8)'s exit codes, without mounting anything (tests of the real
mount(8) and mount.fuse3 are in test_system.py)."""

from __future__ import annotations

import pytest

from modelfs.fs.cli import build_parser, main
from modelfs.fs.mountopts import MountOptionError, mount_argv, split_options


def test_options_map_onto_mount_flags():
    argv = mount_argv(["http://127.0.0.1:8080", "/mnt/m", "-o",
                       "rw,cache=/var/cache/modelfs,cache_max=20G,min_free=1G,max_inflight=32M,"
                       "max_fetches=8,prefetch=sequential,readahead=1M,read_timeout=30,"
                       "fetch_unit=0,model=qwen3:0.6b,model=alice/x:v1,allow_other,dev,suid",
                       "-ocache-max=10G"])
    assert argv == ["mount", "/mnt/m", "--registry", "http://127.0.0.1:8080",
                    "--cache", "/var/cache/modelfs", "--cache-max", "20G", "--min-free", "1G",
                    "--max-inflight", "32M", "--max-fetches", "8", "--prefetch", "sequential",
                    "--readahead", "1M", "--read-timeout", "30", "--fetch-unit", "0",
                    "--model", "qwen3:0.6b", "--model", "alice/x:v1", "--allow-other",
                    "--cache-max", "10G"]  # (the last of a repeated option wins, as in argparse)
    args = build_parser().parse_args(argv)
    assert (args.cache_max, args.model, args.allow_other, args.prefetch, args.fetch_unit) == \
        (10 << 30, ["qwen3:0.6b", "alice/x:v1"], True, "sequential", 0)


def test_mount8_and_vfs_options_are_accepted_and_ignored():
    ignored = ("ro,rw,defaults,_netdev,nofail,noauto,auto,user,users,nouser,owner,group,"
               "nodev,nosuid,noexec,exec,noatime,relatime,sync,async,x-systemd.automount,"
               "x-systemd.idle-timeout=60,X-mount.mkdir,comment=systemd.automount")
    assert mount_argv(["registry.ollama.ai", "/m", "-o", ignored]) == \
        ["mount", "/m", "--registry", "registry.ollama.ai"]


def test_quoted_values_keep_their_commas():
    assert split_options('cache="/srv/a,b",model=x,,ro') == ["cache=/srv/a,b", "model=x", "ro"]
    with pytest.raises(MountOptionError, match="unbalanced quote"):
        split_options('cache="/srv/a')


@pytest.mark.parametrize("argv,message", [
    (["src", "/m", "-o", "bogus,cache=/c,frobnicate=2"],
     "unknown mount options: bogus, frobnicate=2"),
    (["src", "/m", "-o", "setuid=nobody"], "unknown mount option: setuid=nobody"),
    (["src", "/m", "-o", "cache_max"], "cache_max needs a value"),
    (["src", "/m", "-o", "model="], "model needs a value"),
    (["src", "/m", "-o", "allow_other=yes"], "allow_other takes no value"),
    (["src", "/m", "-o"], "-o needs a value"),
    (["src", "/m", "-f"], "unknown argument '-f'"),
    (["src"], "usage: modelfs SOURCE MOUNTPOINT"),
    (["src", "/m", "extra"], "usage: modelfs SOURCE MOUNTPOINT"),
    (["src", "/dev/fd/3", "-o", "cache=/c"], "drop_privileges is not supported"),
])
def test_bad_helper_arguments_are_refused(argv, message):
    with pytest.raises(MountOptionError, match=message):
        mount_argv(argv)


@pytest.mark.parametrize("options,message", [
    ("bogus", "unknown mount option: bogus"),
    ("cache_max=lots", "mount option cache_max: invalid size 'lots'"),
    ("prefetch=eager", "mount option prefetch: invalid choice: 'eager'"),
    ("max_fetches=many", "mount option max_fetches: invalid int value: 'many'"),
])
def test_helper_refusals_exit_1_naming_the_option(tmp_path, capsys, options, message):
    """mount(8)'s code for a bad invocation is 1; the message names the fstab option, not the
    `modelfs mount` flag it maps onto, and nothing is mounted (no mount point was touched)."""
    assert main(["http://127.0.0.1:9", str(tmp_path / "absent"), "-o", options]) == 1
    err = capsys.readouterr().err
    assert err.startswith("modelfs: error: ") and message in err
    assert "--" not in err.split("(")[0]
    assert not (tmp_path / "absent").exists()


def test_a_failed_mount_exits_32(tmp_path, capsys):
    """mount(8)'s code for a mount failure: here a mount point that does not exist."""
    assert main(["http://127.0.0.1:9", str(tmp_path / "absent"), "-o",
                 f"cache={tmp_path / 'cache'}"]) == 32
    assert "is not a directory" in capsys.readouterr().err


def test_subcommands_are_not_taken_for_a_source(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--no-such-flag"])
    assert exc.value.code == 2  # argparse's usage error of the subcommand, as before
    assert "unrecognized arguments" in capsys.readouterr().err
