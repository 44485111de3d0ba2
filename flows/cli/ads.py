"""`alignsearch ads add|remove|status`: the live catalogue of a registered model version,
changed without retraining (each change is a new catalogue version)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from components.catalogue.live import add_ads, open_engine, remove_ads
from components.catalogue.versions import CatalogueConflict
from components.data.validate import ValidationError
from components.outputs import redact_uri
from components.registry.tracking import configure_mlflow
from flows.cli.options import (
    PARAMS_FILE,
    ModelUriOption,
    ParamsOption,
    SetOption,
    console,
    err_console,
    load_config,
)

ads_app = typer.Typer(help="The live catalogue: add and remove ads without retraining.", no_args_is_help=True)


def _catalogue_line(catalogue) -> str:
    return (f"{catalogue.model_name} v{catalogue.model_version}: catalogue {catalogue.label} "
            f"(run {catalogue.run_id or '-'}), {len(catalogue)} ads, {catalogue.index.kind} index")


@ads_app.command("add")
def ads_add(
    ads_dir: Annotated[Path, typer.Argument(help="Folder with ads.parquet (ad_id, title, image_path) and images/.")],
    model_uri: ModelUriOption = None,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Validate new ads (the dataset rules for ads and images), encode them with the model's
    alignment and ad tower, and add them as a new catalogue version. An existing ad id is
    replaced. Any bad row: nothing is added."""
    cfg = load_config(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = add_ads(model_uri or cfg.serve.model_uri, ads_dir, validate_cfg=cfg.validation,
                         cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment)
    except ValidationError as exc:
        err_console.print(f"[red]Refused, nothing added:[/red]\n{exc}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    except (LookupError, CatalogueConflict) as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(f"Added {len(result.added)}, replaced {len(result.replaced)} ads "
                  f"({result.ads_per_second:.1f} ads/s encoding, {result.encode_seconds:.1f} s).")
    console.print(_catalogue_line(result.catalogue))


@ads_app.command("remove")
def ads_remove(
    ad_ids: Annotated[list[str], typer.Argument(help="Ad ids to take out.")],
    model_uri: ModelUriOption = None,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Take ads out of the live catalogue (a new catalogue version). An unknown id: nothing removed."""
    cfg = load_config(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = remove_ads(model_uri or cfg.serve.model_uri, ad_ids, cache_dir=cfg.data.cache_dir,
                            experiment=cfg.registry.experiment)
    except (KeyError, ValueError, LookupError, CatalogueConflict) as exc:
        err_console.print(f"[red]Refused, nothing removed:[/red] {redact_uri(str(exc))}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    console.print(f"Removed {len(result.removed)} ads.")
    console.print(_catalogue_line(result.catalogue))


@ads_app.command("status")
def ads_status(model_uri: ModelUriOption = None, params: ParamsOption = PARAMS_FILE,
               set_: SetOption = None) -> None:
    """The current catalogue version of the model and its size."""
    cfg = load_config(params, set_)
    configure_mlflow(cfg.registry)
    try:
        engine, _ = open_engine(model_uri or cfg.serve.model_uri, cache_dir=cfg.data.cache_dir)
    except LookupError as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(_catalogue_line(engine.catalogue))
