"""Every command, nested ones included, explains itself with at least one example."""
from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from sdq.cli.main import cli


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"sdq {' '.join(path)} --help shows no example"
    assert f"sdq {' '.join(path)}" in result.output.split("Example", 1)[1]
