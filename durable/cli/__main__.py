"""``python -m durable.cli``: the ``durable`` command."""

from durable.cli import main

main()
