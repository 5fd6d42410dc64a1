"""The command line's help: nothing cut off, every command and option described."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from dbmtls import __version__
from dbmtls.cli import main


def _groups() -> list[list[str]]:
    out: list[list[str]] = [[]]
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            out.append([name])
    return out


@pytest.mark.parametrize("path", _groups(), ids=lambda p: " ".join(["dbmtls", *p]))
def test_command_lists_are_not_cut_off(path: list[str]) -> None:
    """click shortens a description that does not fit with '...': a first-time user loses the point."""
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:", 1)[1]
    assert "..." not in commands, commands


def test_every_command_and_option_has_help() -> None:
    def walk(cmd: click.Command, where: str) -> list[str]:
        missing = [] if cmd.help else [where]
        missing += [f"{where} {p.name}" for p in cmd.params if isinstance(p, click.Option) and not p.help]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                missing += walk(sub, f"{where} {name}")
        return missing

    undocumented = walk(main, "dbmtls")
    assert undocumented == []


def test_version_flag() -> None:
    for flag in ("--version", "-V"):
        result = CliRunner().invoke(main, [flag])
        assert result.exit_code == 0 and result.output == f"dbmtls {__version__}\n"
