"""The `alignsearch` command line: thin Typer wrappers around component stage functions and
the Prefect flows. This module builds the app; each command group lives in its own module
(data, pipeline, stages, search, ads, team, traffic) and options.py holds what they share.

Commands import the modules that load torch, MLflow, Prefect or FastAPI when they run, so
`alignsearch search` and `--help` stay fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from components.data.format import DatasetFormatError
from flows.cli import pipeline, search, stages
from flows.cli.ads import ads_app
from flows.cli.data import data_app
from flows.cli.options import err_console
from flows.cli.stages import align_app
from flows.cli.team import team_app
from flows.cli.traffic import traffic_app
from flows.runtime import setup_runtime


class _Commands(typer.core.TyperGroup):
    """The command group: a dataset (or file) that is missing or malformed is a usage error with
    one line saying what is wrong, from every command, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (DatasetFormatError, FileNotFoundError, NotADirectoryError) as exc:
            message = str(exc) if isinstance(exc, DatasetFormatError) or not getattr(exc, "filename", None) \
                else f"{exc.filename}: {exc.strerror}"
            if isinstance(exc, FileNotFoundError) and "not found" not in message and "No such" not in message:
                message += ": file not found"
            err_console.print(f"[red]Error:[/red] {message}", soft_wrap=True)
            raise typer.Exit(2) from exc


app = typer.Typer(
    cls=_Commands,
    name="alignsearch",
    help="Cross-modal sponsored search: align ad image parts to words without labels, "
    "then match queries to ads in language space (Align before Search, arXiv 2309.16141).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)

# The top-level commands, in the order `alignsearch --help` lists them; the groups follow.
COMMANDS = (
    ("retrain", pipeline.retrain),
    ("promote", pipeline.promote),
    ("rollback", pipeline.rollback),
    ("run", pipeline.run),
    ("search", search.search),
    ("serve", search.serve),
    ("bench-serve", search.bench_serve),
    ("schedule", pipeline.schedule),
    ("features", stages.features),
    ("train-matcher", stages.train_matcher),
    ("evaluate", stages.evaluate),
    ("benchmark", stages.benchmark),
    ("benchmark-loop", stages.benchmark_loop),
    ("bench-index", search.bench_index),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
app.add_typer(data_app, name="data")
app.add_typer(align_app, name="align")
app.add_typer(team_app, name="team")
app.add_typer(ads_app, name="ads")
app.add_typer(traffic_app, name="traffic")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_runtime(verbose=verbose)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
