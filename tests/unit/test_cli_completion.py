"""``aiodetach completion bash|zsh``: the bash script completes subcommands,
options and domain names in a real bash (its completion function called the way
bash calls it on Tab); the zsh script parses and registers itself."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _probes import child_env
from aiodetach._cli_args import build_parser

BASH = shutil.which("bash") or "/bin/bash"


def script(shell: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "aiodetach", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "aiodetach.bash"
    path.write_text(script("bash"))
    return path


def complete(bash_script: Path, line: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash offers on Tab after ``line`` (the word being completed is its
    last, empty after a trailing space)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = (
        f"source {shlex.quote(str(bash_script))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_aiodetach\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    proc = subprocess.run(
        [BASH, "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {**os.environ, "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_bash_completes_subcommands(bash_script: Path) -> None:
    assert sorted(complete(bash_script, "aiodetach ")) == sorted(_subcommands())
    assert complete(bash_script, "aiodetach detach") == ["detach", "detach-many"]
    assert complete(bash_script, "aiodetach -v wa") == ["watch"]


def test_bash_completes_every_option_of_each_subcommand(bash_script: Path) -> None:
    """The options offered are the parser's own, so they cannot drift."""
    for name, sub in _subcommands().items():
        expected = sorted(
            s for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings
        )
        assert sorted(complete(bash_script, f"aiodetach {name} -")) == expected, name
    assert complete(bash_script, "aiodetach detach vm --al") == ["--alias"]
    assert complete(bash_script, "aiodetach detach-many b.txt --con") == ["--concurrency"]


def test_bash_skips_option_values_and_completes_choices(bash_script: Path) -> None:
    # "--alias x" is an option and its value: the next word is still an option.
    assert complete(bash_script, "aiodetach detach vm --alias x --ti") == ["--timeout"]
    assert complete(bash_script, "aiodetach completion ") == ["bash", "zsh"]
    assert complete(bash_script, "aiodetach completion z") == ["zsh"]


def test_bash_completes_domain_names_from_virsh(bash_script: Path, tmp_path: Path) -> None:
    """Domain names come from ``virsh --readonly list --all --name`` on the URI
    named on the line (here a stand-in virsh recording how it was called)."""
    calls = tmp_path / "calls"
    virsh = tmp_path / "virsh"
    virsh.write_text(
        f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\nprintf "vm-1\\nvm-2\\nweb\\n"\n'
    )
    virsh.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    env.pop("LIBVIRT_DEFAULT_URI", None)
    assert complete(bash_script, "aiodetach detach vm", env) == ["vm-1", "vm-2"]
    assert complete(bash_script, "aiodetach watch --uri test:///default w", env) == ["web"]
    assert calls.read_text().splitlines() == [
        "--readonly -c qemu:///system list --all --name",
        "--readonly -c test:///default list --all --name",
    ]


def test_bash_offers_no_domains_without_virsh(bash_script: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no virsh (and nothing else) on PATH
    assert complete(bash_script, "aiodetach detach v", env) == []


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script_parses(tmp_path: Path) -> None:
    path = tmp_path / "_aiodetach"
    text = script("zsh")
    path.write_text(text)
    assert text.startswith("#compdef aiodetach\n")
    proc = subprocess.run(
        ["zsh", "-n", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name in _subcommands():
        assert f"'{name}:" in text  # every subcommand is offered, with its help
    # Loaded (eval'ed or sourced) after compinit, it registers itself for aiodetach.
    loaded = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"autoload -U compinit; compinit -u -D; source {path}; print -r -- $_comps[aiodetach]",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.stdout.strip() == "_aiodetach", loaded.stderr
