"""Write the ``--help`` of every ``durable`` command into ``docs/cli.md``.

Run ``python docs/gen_cli.py`` after changing a command; ``--check`` only compares and exits 1
when ``docs/cli.md`` is stale (a test does the same, so the reference cannot drift).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

from durable.cli import cli

OUTPUT = Path(__file__).with_name("cli.md")
WIDTH = 100
HEADER = """# `durable` command reference

Generated from each command's `--help` by `python docs/gen_cli.py`; do not edit by hand.

Every option can also be set from the environment variable shown beside it. A failing command
prints one line, `durable: <reason>`, on stderr and exits 1 (2 for bad options or arguments).
"""


def _contexts(ctx: click.Context) -> Iterator[click.Context]:
    yield ctx
    command = ctx.command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _contexts(sub.make_context(name, [], parent=ctx, resilient_parsing=True))


def render() -> str:
    """The reference: one section per command, its help text at a fixed width."""
    root = cli.make_context(
        "durable", [], resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
    )
    sections = [HEADER]
    for ctx in _contexts(root):
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{ctx.get_help()}\n```\n")
    return "\n".join(sections)


def main(argv: list[str]) -> int:
    """Write ``docs/cli.md``, or with ``--check`` report whether it is up to date."""
    text = render()
    if "--check" in argv:
        if OUTPUT.exists() and OUTPUT.read_text(encoding="utf-8") == text:
            return 0
        print(f"{OUTPUT.name} is stale: run python docs/gen_cli.py", file=sys.stderr)
        return 1
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
