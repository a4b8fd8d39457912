"""The ``spikesim`` command line.

Results go to stdout (``--json`` for machines), progress and logs to stderr. A user's mistake
(bad option, missing or corrupt file, unknown task) ends with a one-line ``Error: ...`` and a
non-zero exit, never a traceback: :class:`SpikingBertError` becomes a ``click.ClickException``.
Commands live beside the modules they drive and are registered on the group at the bottom.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import SpikingBertError


class SpikesimGroup(click.Group):
    """A click group that turns the package's user errors into one-line click errors."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpikingBertError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


@click.group(cls=SpikesimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spikesim")
def main() -> None:
    """Simulate, train and compare 1 / 1.58-bit spiking BERT models."""


def positive_int(ctx, param, value):
    """click callback: a positive integer (or None)."""
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be a positive integer, got {value}")
    return value


def initial_membrane_option(fn):
    """``--initial-membrane``: override the checkpoint's U[0] (see :func:`load_simulated`)."""
    return click.option("--initial-membrane", type=click.FloatRange(0, 1, max_open=True), default=None,
                        help="Start every membrane at this fraction of the threshold instead of the checkpoint's "
                             "(0, the paper's): 0.5 rounds each rate instead of flooring it, halving the error of a "
                             "finite simulation.")(fn)


def load_simulated(checkpoint: str, initial_membrane: float | None = None):
    """A checkpoint to simulate and its tokenizer (stored in it, or the one it names): ``(LoadedCheckpoint,
    tokenizer)``, the model's U[0] set to ``initial_membrane`` (``--initial-membrane``; None: the checkpoint's)."""
    from .checkpoint import load_checkpoint
    from .hf import checkpoint_tokenizer

    ckpt = load_checkpoint(checkpoint)
    if initial_membrane is not None:
        ckpt.model.config = ckpt.model.config.replace(initial_membrane=float(initial_membrane))
    return ckpt, checkpoint_tokenizer(ckpt.meta)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def log(msg: str) -> None:
    click.echo(msg, err=True)


def _register() -> None:
    # Each command sits in the cli_* module of its subject; each such module lists COMMANDS.
    from . import cli_sim, cli_train

    for module in (cli_sim, cli_train):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
