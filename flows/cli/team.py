"""`alignsearch team up|down|status`: the team stack on 127.0.0.1 without Docker. The
supervision itself (processes, ports, health) is infra/team/supervisor.py; this is its CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from infra.team.supervisor import ENV_FILE, SERVICES, TeamError, down, status, up

team_app = typer.Typer(help="The team stack (Postgres, S3, MLflow, Prefect, Dask, a worker) on 127.0.0.1, no Docker.",
                       no_args_is_help=True)
DirOption = Annotated[Path, typer.Option("--dir", help="State directory (git-ignored).")]
TEAM_DIR = Path(".team")


@team_app.command("up")
def up_command(
    dir: DirOption = TEAM_DIR,
    port: Annotated[list[str] | None, typer.Option("--port", help="Fix a port, e.g. --port mlflow=5000 (repeatable).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds each service may take to become healthy.")] = 240.0,
) -> None:
    """Start the stack and write DIR/env (`source .team/env` points a shell at it)."""
    fixed = {}
    for item in port or []:
        name, _, value = item.partition("=")
        if name not in SERVICES or not value.isdigit():
            raise typer.BadParameter(f"{item!r}: expected SERVICE=PORT with SERVICE in {', '.join(SERVICES)}")
        fixed[name] = int(value)
    try:
        state = up(dir, fixed, timeout)
    except TeamError as exc:
        typer.echo(f"team up failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    _print_status(dir)
    typer.echo(f"healthy in {state.startup_seconds} s; run `source {Path(dir) / ENV_FILE}`")


@team_app.command("down")
def down_command(dir: DirOption = TEAM_DIR) -> None:
    """Stop everything `team up` started (Postgres data stays in DIR/postgres)."""
    try:
        stopped = down(dir)
    except TeamError as exc:
        typer.echo(f"team down: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@team_app.command("status")
def status_command(dir: DirOption = TEAM_DIR) -> None:
    """Each service, its port and health; exits 1 unless all are healthy."""
    if not _print_status(dir):
        raise typer.Exit(1)


def _print_status(root: Path) -> bool:
    rows = status(root)
    if not rows:
        typer.echo(f"no team stack in {root}")
        return False
    for row in rows:
        health = "healthy" if row.healthy else ("running, not healthy" if row.running else "stopped")
        typer.echo(f"{row.name:<14} {health:<21} pid {row.pid or '-':<8} {row.url}")
    return all(row.healthy for row in rows)
