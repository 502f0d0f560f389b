"""``chatd bench`` command (being written)."""

import click


@click.command()
def bench():
    """Load tester (work in progress)."""
    raise click.ClickException("chatd bench is not implemented yet")
