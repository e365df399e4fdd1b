"""The ``mtreg`` command: global options, error handling and the command groups.

Commands live in modules named for their topic; each one is a thin layer over
:class:`mtreg.Registry`, so everything here is also available from Python.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

from mtreg.cli import (
    bundle,
    db,
    demo,
    events,
    inference,
    onboard,
    plugin,
    release,
    report,
    scaffold,
    serve,
    task,
    trunk,
    verify,
)
from mtreg.cli.context import Context
from mtreg.core.env import DATABASE_ENV, HOME_ENV, PLUGINS_PATH_ENV, STORE_ENV
from mtreg.core.extras import missing_extra
from mtreg.errors import MtregError


class _UsageError(click.UsageError):
    """A usage error (unknown option, missing argument, bad value) as one line naming the
    command's ``--help``, rather than click's usage text above it; the exit code stays 2, so
    that a script can tell a wrong call from a failing one (exit code 1)."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Print the one line to ``file`` (default stderr)."""
        message = " ".join(self.format_message().split("\n")).removesuffix(".")
        where = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        click.echo(f"Error: {message}{where}", file=file, err=True)


@contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare group: its help is the answer
    except click.UsageError as exc:
        if isinstance(exc, _UsageError):
            raise
        raise _UsageError(exc.format_message(), exc.ctx) from None


class _Group(click.Group):
    """Turns every :class:`MtregError` into one line on stderr and exit code 1, and every
    usage error into one line and exit code 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        """Return the context of ``mtreg ARGS``; a usage error in the global options is one
        line (:class:`_UsageError`)."""
        with _one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context):
        try:
            with _one_line_usage():
                return super().invoke(ctx)
        except (MtregError, ImportError) as exc:
            # An ImportError is shown as one line only for an optional extra a command
            # imports when it runs (serve, onnx, report): anything else is a bug.
            error = exc if isinstance(exc, MtregError) else missing_extra(exc)
            settings = ctx.find_object(Context)
            if error is None or (settings and settings.debug):
                raise
            raise click.ClickException(str(error).replace("\n", " ")) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "url",
    envvar=DATABASE_ENV,
    metavar="URL",
    help=f"SQLAlchemy database URL [env {DATABASE_ENV}; default: SQLite in {HOME_ENV}].",
)
@click.option(
    "--store",
    envvar=STORE_ENV,
    metavar="URL",
    help=f"Object store shared by machines: s3://BUCKET/PREFIX, gs://, az:// or a folder, "
    f"cached in {HOME_ENV} [env {STORE_ENV}; default: {HOME_ENV}/objects].",
)
@click.option(
    "--home",
    envvar=HOME_ENV,
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Registry home (objects, bundles, SQLite) [env {HOME_ENV}].",
)
@click.option(
    "--plugins-dir",
    "plugins_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help=f"Extra plugin file or directory (repeatable) [env {PLUGINS_PATH_ENV}].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="mtreg")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str | None,
    store: str | None,
    home: Path | None,
    plugins_dirs: tuple[Path, ...],
    debug: bool,
) -> None:
    """mtreg: register task plugins on a shared BERT trunk and merge them into bundles."""
    ctx.obj = Context(url=url, home=home, plugins_dirs=plugins_dirs, debug=debug, store=store)
    ctx.call_on_close(ctx.obj.close)


# Two short lines rather than one name per line, which would repeat the import above.
_FIRST = (bundle, db, demo, events, inference, onboard, plugin)
for module in (*_FIRST, release, report, scaffold, serve, task, trunk, verify):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    """Entry point of the ``mtreg`` console script."""
    sys.exit(cli.main(prog_name="mtreg"))
