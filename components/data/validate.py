"""The `validate` stage: check a dataset directory against the interchange format with Great Expectations.

Every rule is a Great Expectations expectation, one suite per table (ads, queries, qrels)
plus suites for images, cross-table references and split coverage. Rules that are not
plain column checks (a qrel's ad exists, an image decodes) are computed first as per-row
fact columns and then expected on, so every failure names the offending rows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from components.data.config import ValidateConfig
from components.data.format import (
    ADS_COLUMNS,
    ADS_FILE,
    ADS_OPTIONAL_COLUMNS,
    QRELS_COLUMNS,
    QRELS_FILE,
    QRELS_OPTIONAL_COLUMNS,
    QUERIES_COLUMNS,
    QUERIES_FILE,
    SPLITS,
    read_dataset,
)

log = logging.getLogger(__name__)

IMAGES_TABLE = "images/"
DATASET_TABLE = "dataset"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "alignsearch_validation"
JSON_REPORT = "validation.json"
MARKDOWN_REPORT = "validation.md"


@dataclass(frozen=True)
class ImageFormat:
    media_type: str  # what /image answers it as
    suffix: str  # what an added ad's image is stored under


# The formats an ad image may have, by Pillow's name: validation opens images with these
# decoders only (Pillow reads many more, EPS through Ghostscript among them), an added image
# is stored under the suffix of the format detected in it (never the name it came with), and
# the service answers with the media type of that format.
IMAGE_FORMATS = {"PNG": ImageFormat("image/png", ".png"), "JPEG": ImageFormat("image/jpeg", ".jpg"),
                 "WEBP": ImageFormat("image/webp", ".webp")}
FORMAT_NAMES = "PNG, JPEG or WebP"


def open_image(path: Path):
    """`PIL.Image.open` restricted to IMAGE_FORMATS (another format raises
    `PIL.UnidentifiedImageError`); reads the header only."""
    from PIL import Image

    return Image.open(path, formats=list(IMAGE_FORMATS))


def image_format(path: Path) -> str | None:
    """The IMAGE_FORMATS name of the image at `path` from its header, or None (another format,
    not an image, unreadable)."""
    try:
        with open_image(path) as image:
            return image.format
    except Exception:  # Pillow raises many types for files it cannot identify
        return None


@dataclass
class RuleFailure:
    """One failed rule: where, what, how many rows and a few offenders.

    `examples` are the offending rows' ids (ad_id, query_id, "query_id -> ad_id", image
    path or split name); `details` holds, per example, the offending values.
    """

    table: str
    rule: str
    column: str | None
    count: int
    examples: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    suite: str = ""
    expectation: str = ""
    note: str = ""


# Statistics of the run, not of the data: kept out of the DVC-tracked validation.json.
MACHINE_STATS = ("timing", "seconds", "workers")


@dataclass
class ValidationResult:
    root: Path
    success: bool
    failures: list[RuleFailure]
    stats: dict[str, dict[str, Any]]
    seconds: float
    num_rules: int = 0
    report_paths: dict[str, Path] = field(default_factory=dict)

    def failed_rules(self) -> list[str]:
        return [f.rule for f in self.failures]

    def raise_if_failed(self) -> ValidationResult:
        if not self.success:
            raise ValidationError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["root"] = str(self.root)
        out["report_paths"] = {k: str(v) for k, v in self.report_paths.items()}
        return out

    def report_dict(self) -> dict[str, Any]:
        """What `validation.json` holds: the verdict, failures and statistics of the data only.
        DVC tracks the file, so nothing that changes from run to run with the same data goes in
        (timings, thread counts, where the reports were written); validation.md has those."""
        out = self.to_dict()
        for key in ("seconds", "report_paths"):
            out.pop(key)
        out["stats"] = {k: v for k, v in out["stats"].items() if k not in MACHINE_STATS}
        if out["stats"].get("images"):
            out["stats"]["images"] = {k: v for k, v in out["stats"]["images"].items() if k not in MACHINE_STATS}
        return out


class ValidationError(Exception):
    """Raised by `ValidationResult.raise_if_failed`; the message is the short report."""

    def __init__(self, result: ValidationResult):
        self.result = result
        super().__init__(format_report(result))


# --------------------------------------------------------------------------- rules


@dataclass
class Rule:
    name: str  # the sentence the report shows, e.g. "ad_id must be unique"
    column: str | None  # the dataset column the rule is about
    expectation: Any  # a great_expectations expectation
    show: tuple[str, ...] = ()  # frame columns printed beside each offender's id


@dataclass
class Suite:
    name: str
    table: str  # what the report names: a file, "images/" or "dataset"
    frame: pd.DataFrame  # the table plus fact columns, index 0..n-1
    row_id: Callable[[pd.DataFrame, int], str]
    rules: list[Rule] = field(default_factory=list)
    data_columns: list[str] = field(default_factory=list)  # the table's own columns, before facts


def isnull(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and arrays are values, not nulls
        return False


def _facts(series: pd.Series, fn: Callable[[Any], Any]) -> pd.Series:
    """Per-row fact of a column: None where the value is null (null rules report those)."""
    return pd.Series([None if isnull(v) else fn(v) for v in series.tolist()], index=series.index, dtype=object)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and float(value).is_integer()


def _is_positive_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return bool(np.isfinite(value)) and float(value) > 0


def _id_of(column: str) -> Callable[[pd.DataFrame, int], str]:
    def row_id(frame: pd.DataFrame, i: int) -> str:
        if column in frame.columns and not isnull(frame.at[i, column]):
            return str(frame.at[i, column])
        return f"row {i}"

    return row_id


def _qrel_id(frame: pd.DataFrame, i: int) -> str:
    parts = []
    for column in ("query_id", "ad_id"):
        value = frame.at[i, column] if column in frame.columns else None
        parts.append("?" if isnull(value) else str(value))
    return f"{parts[0]} -> {parts[1]}" if parts != ["?", "?"] else f"row {i}"


def _table_rules(gx, suite: Suite, required: dict[str, str], optional: dict[str, str]) -> None:
    """Column presence, nulls, types and split values of one table (facts added to its frame)."""
    E = gx.expectations
    frame = suite.frame
    suite.data_columns = [str(c) for c in frame.columns]
    for column in required:
        if column not in frame.columns:
            suite.rules.append(Rule(f"required column '{column}' must be present", column, E.ExpectColumnToExist(column=column)))
    present = [c for c in required if c in frame.columns] + [c for c in optional if c in frame.columns]
    for column in present:
        dtype = {**required, **optional}[column]
        if column in required:
            suite.rules.append(Rule(f"{column} must not be null", column, E.ExpectColumnValuesToNotBeNull(column=column)))
        if column == "split":
            suite.rules.append(Rule(
                f"split must be one of {', '.join(SPLITS)}", column,
                E.ExpectColumnValuesToBeInSet(column=column, value_set=list(SPLITS)), show=(column,)))
        elif dtype == "string":
            fact = f"{column}_is_string"
            frame[fact] = _facts(frame[column], lambda v: isinstance(v, str))
            suite.rules.append(Rule(
                f"{column} must be a string", column,
                E.ExpectColumnValuesToBeInSet(column=fact, value_set=[True]), show=(column,)))
        elif column == "relevance":
            frame["relevance_is_integer"] = _facts(frame[column], _is_integer)
            frame["relevance_value"] = pd.to_numeric(
                _facts(frame[column], lambda v: float(v) if _is_integer(v) else None), errors="coerce")
            suite.rules.append(Rule(
                "relevance must be an integer", column,
                E.ExpectColumnValuesToBeInSet(column="relevance_is_integer", value_set=[True]), show=(column,)))
            suite.rules.append(Rule(
                "relevance must be >= 0", column,
                E.ExpectColumnValuesToBeBetween(column="relevance_value", min_value=0), show=(column,)))
        elif column == "weight":  # optional, but then on every row: a null weight is an error
            frame["weight_is_positive_finite"] = pd.Series(
                [_is_positive_finite(v) for v in frame[column].tolist()], index=frame.index, dtype=object)
            suite.rules.append(Rule(
                "weight must be a finite number > 0", column,
                E.ExpectColumnValuesToBeInSet(column="weight_is_positive_finite", value_set=[True]), show=(column,)))


def _ads_suite(gx, ads: pd.DataFrame) -> Suite:
    suite = Suite("ads", ADS_FILE, ads.copy().reset_index(drop=True), _id_of("ad_id"))
    _table_rules(gx, suite, ADS_COLUMNS, ADS_OPTIONAL_COLUMNS)
    if "ad_id" in suite.frame.columns:
        suite.rules.append(Rule("ad_id must be unique", "ad_id", gx.expectations.ExpectColumnValuesToBeUnique(column="ad_id")))
    return suite


def _queries_suite(gx, queries: pd.DataFrame) -> Suite:
    E = gx.expectations
    suite = Suite("queries", QUERIES_FILE, queries.copy().reset_index(drop=True), _id_of("query_id"))
    _table_rules(gx, suite, QUERIES_COLUMNS, {})
    frame = suite.frame
    if "query_id" in frame.columns:
        suite.rules.append(Rule("query_id must be unique", "query_id", E.ExpectColumnValuesToBeUnique(column="query_id")))
    if "text" in frame.columns:
        frame["text_stripped_length"] = pd.to_numeric(
            _facts(frame["text"], lambda v: len(v.strip()) if isinstance(v, str) else None), errors="coerce")
        suite.rules.append(Rule(
            "text must be non-empty after strip", "text",
            E.ExpectColumnValuesToBeBetween(column="text_stripped_length", min_value=1), show=("text",)))
    return suite


def _qrels_suite(gx, qrels: pd.DataFrame) -> Suite:
    suite = Suite("qrels", QRELS_FILE, qrels.copy().reset_index(drop=True), _qrel_id)
    _table_rules(gx, suite, QRELS_COLUMNS, QRELS_OPTIONAL_COLUMNS)
    if {"query_id", "ad_id"} <= set(suite.frame.columns):
        suite.rules.append(Rule(
            "(query_id, ad_id) pairs must be unique", "query_id, ad_id",
            gx.expectations.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "ad_id"])))
    return suite


def _lookup(table: pd.DataFrame, key: str, value: str) -> dict[Any, Any] | None:
    if key not in table.columns or value not in table.columns:
        return None
    first = table.drop_duplicates(subset=[key])
    return {k: v for k, v in zip(first[key].tolist(), first[value].tolist(), strict=True) if not isnull(k)}


def _cross_table_suite(gx, ads: pd.DataFrame, queries: pd.DataFrame, qrels: pd.DataFrame) -> Suite:
    """Per-qrel facts: does its query/ad exist, and is it in the same split as both."""
    E = gx.expectations
    keep = [c for c in ("query_id", "ad_id", "split") if c in qrels.columns]
    frame = qrels[keep].copy().reset_index(drop=True)
    suite = Suite("cross_table", QRELS_FILE, frame, _qrel_id)
    for side, table, file_name in (("query", queries, QUERIES_FILE), ("ad", ads, ADS_FILE)):
        key = f"{side}_id"
        if key not in frame.columns or key not in table.columns:
            continue
        split_of = _lookup(table, key, "split")
        known = set(table[key].dropna().tolist())
        frame[f"{side}_exists"] = _facts(frame[key], lambda v, known=known: v in known)
        suite.rules.append(Rule(
            f"{key} must refer to a{'n' if side == 'ad' else ''} {side} in {file_name}", key,
            E.ExpectColumnValuesToBeInSet(column=f"{side}_exists", value_set=[True])))
        if split_of is None or "split" not in frame.columns:
            continue
        frame[f"{side}_split"] = _facts(frame[key], lambda v, split_of=split_of: split_of.get(v))
        frame[f"split_matches_{side}"] = pd.Series(
            [None if isnull(s) or isnull(o) else s == o
             for s, o in zip(frame["split"].tolist(), frame[f"{side}_split"].tolist(), strict=True)],
            dtype=object)
        suite.rules.append(Rule(
            f"qrel split must equal its {side}'s split", "split",
            E.ExpectColumnValuesToBeInSet(column=f"split_matches_{side}", value_set=[True]),
            show=("split", f"{side}_split")))
    return suite


def _splits_suite(gx, ads: pd.DataFrame, queries: pd.DataFrame, qrels: pd.DataFrame) -> Suite:
    """One row per split: how many ads, queries, and queries with a positive qrel it has."""
    rows = []
    positive_queries: set[Any] = set()
    if {"query_id", "relevance"} <= set(qrels.columns):
        relevance = pd.to_numeric(_facts(qrels["relevance"], lambda v: float(v) if _is_integer(v) else None), errors="coerce")
        positive_queries = set(qrels.loc[(relevance > 0).to_numpy(), "query_id"].dropna().tolist())
    can_count = {"query_id", "split"} <= set(queries.columns)
    for split in SPLITS:
        row: dict[str, Any] = {"split": split}
        row["num_ads"] = int((ads["split"] == split).sum()) if "split" in ads.columns else None
        if can_count:
            in_split = queries.loc[(queries["split"] == split).to_numpy(), "query_id"]
            row["num_queries"] = int(len(in_split))
            row["num_queries_with_positive_qrel"] = int(in_split.isin(positive_queries).sum())
        rows.append(row)
    suite = Suite("splits", DATASET_TABLE, pd.DataFrame(rows), _id_of("split"))
    if can_count and "relevance" in qrels.columns:
        suite.rules.append(Rule(
            "every split must have a query with a positive qrel", "split",
            gx.expectations.ExpectColumnValuesToBeBetween(column="num_queries_with_positive_qrel", min_value=1),
            show=("num_queries", "num_queries_with_positive_qrel")))
    return suite


# --------------------------------------------------------------------------- images


class _ImageFacts(NamedTuple):
    """What validation learns of one image; None where it does not apply (a missing file has no
    size). `linked`: the path goes through a symlink (refused wherever it points); `too_large`:
    more pixels than allowed (then it is not decoded)."""

    exists: bool
    linked: bool | None = None
    decodes: bool | None = None
    width: int | None = None
    height: int | None = None
    too_large: bool | None = None


_MISSING = _ImageFacts(False)


def _check_image(real_root: str, image_path: Any, max_pixels: int) -> _ImageFacts:
    """The facts of one image at `image_path` under `real_root` (the directory's real path).
    Its size is read from the header first: one of more than `max_pixels` is not decoded."""
    from PIL import Image

    if not isinstance(image_path, str) or not image_path or os.path.isabs(image_path):
        return _MISSING
    normalised = os.path.normpath(image_path)
    if normalised == ".." or normalised.startswith(".." + os.sep):
        return _MISSING  # outside the dataset directory
    path = os.path.join(real_root, normalised)
    if not os.path.lexists(path):
        return _MISSING
    if os.path.realpath(path) != path:  # a symlink, here or in a folder on the way
        return _ImageFacts(True, linked=True)
    if not os.path.isfile(path):
        return _MISSING
    try:
        with open_image(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return _ImageFacts(True, False, None, int(width), int(height), too_large=True)
            image.verify()  # structure and checksums
        with open_image(path) as image:  # verify() leaves the file unusable: reopen to decode pixels
            image.load()
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own ceiling (2 x MAX_IMAGE_PIXELS), met on open
        return _ImageFacts(True, False, None, too_large=True)
    except Exception:  # Pillow raises many types for broken files
        return _ImageFacts(True, False, False)
    return _ImageFacts(True, False, True, int(width), int(height), too_large=False)


def _images_suite(gx, root: Path, ads: pd.DataFrame, cfg: ValidateConfig) -> tuple[Suite | None, dict[str, Any]]:
    if "image_path" not in ads.columns:
        return None, {}
    E = gx.expectations
    started = time.perf_counter()
    keep = [c for c in ("ad_id", "image_path") if c in ads.columns]
    frame = ads[keep].copy().reset_index(drop=True)
    paths = [p for p in dict.fromkeys(frame["image_path"].tolist()) if not isnull(p)]
    # Pillow decodes with the GIL released, so threads scale over cores without pickling.
    workers = min(32, 4 * (os.cpu_count() or 1))
    real_root = os.path.realpath(root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = dict(zip(paths, pool.map(lambda p: _check_image(real_root, p, cfg.max_image_pixels), paths),
                           strict=True))
    facts = [checked.get(p, _MISSING) if not isnull(p) else _MISSING for p in frame["image_path"].tolist()]
    frame["image_exists"] = pd.Series([f.exists for f in facts], dtype=object)
    frame["image_not_linked"] = pd.Series([None if f.linked is None else not f.linked for f in facts], dtype=object)
    frame["image_decodes"] = pd.Series([f.decodes for f in facts], dtype=object)
    frame["image_pixels_within_limit"] = pd.Series([None if f.too_large is None else not f.too_large for f in facts],
                                                   dtype=object)
    frame["image_width"] = pd.to_numeric(pd.Series([f.width for f in facts], dtype=object), errors="coerce")
    frame["image_height"] = pd.to_numeric(pd.Series([f.height for f in facts], dtype=object), errors="coerce")
    frame["image_min_side"] = frame[["image_width", "image_height"]].min(axis=1, skipna=False)
    suite = Suite("images", IMAGES_TABLE, frame, _id_of("image_path"))
    suite.rules = [
        Rule("image_path must exist under the dataset directory", "image_path",
              E.ExpectColumnValuesToBeInSet(column="image_exists", value_set=[True])),
        Rule("image_path must not be a symlink (nor lead out of the directory through one)", "image_path",
              E.ExpectColumnValuesToBeInSet(column="image_not_linked", value_set=[True])),
        Rule(f"image must decode as {FORMAT_NAMES} (Pillow verify + load)", "image_path",
              E.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=[True])),
        Rule(f"image must have at most {cfg.max_image_pixels:,} pixels (validate.max_image_pixels)", "image_path",
              E.ExpectColumnValuesToBeInSet(column="image_pixels_within_limit", value_set=[True]),
              show=("image_width", "image_height")),
        Rule(f"image sides must be >= {cfg.min_image_side} px", "image_path",
              E.ExpectColumnValuesToBeBetween(column="image_min_side", min_value=cfg.min_image_side),
              show=("image_width", "image_height")),
    ]
    sides = frame["image_min_side"].dropna()
    stats = {
        "files": len(paths),
        "missing": int(sum(1 for f in checked.values() if not f.exists)),
        "linked": int(sum(1 for f in checked.values() if f.linked)),
        "undecodable": int(sum(1 for f in checked.values() if f.decodes is False)),
        "too_large": int(sum(1 for f in checked.values() if f.too_large)),
        "min_side": int(sides.min()) if len(sides) else None,
        "max_side": int(max(frame["image_width"].max(), frame["image_height"].max())) if len(sides) else None,
        "workers": workers,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return suite, stats


# --------------------------------------------------------------------------- running


def _table_stats(table: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": int(len(table)), "columns": [str(c) for c in table.columns]}
    if "split" in table.columns:
        counts = table["split"].value_counts(dropna=False)
        out["splits"] = {str(k): int(v) for k, v in counts.items()}
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _failures_of(suite: Suite, result: Any, max_examples: int) -> list[RuleFailure]:
    rules = {rule.expectation.meta["rule_key"]: rule for rule in suite.rules}
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        rule = rules[config.meta["rule_key"]]
        failure = RuleFailure(table=suite.table, rule=rule.name, column=rule.column, count=0,
                              suite=suite.name, expectation=config.type)
        exception = _exception_message(item.exception_info)
        if config.type == "expect_column_to_exist":
            failure.count = int(len(suite.frame))
            failure.note = f"column missing (the table has {', '.join(suite.data_columns) or 'no columns'})"
        elif exception:
            failure.note = f"could not be evaluated: {exception}"
        else:
            rows = item.result.get("unexpected_index_list") or []
            failure.count = int(item.result.get("unexpected_count", len(rows)))
            for i in map(int, rows[:max_examples]):
                failure.examples.append(suite.row_id(suite.frame, i))
                failure.details.append(", ".join(
                    f"{c}={_format_value(suite.frame.at[i, c])}" for c in rule.show if c in suite.frame.columns))
        failures.append(failure)
    return failures


def _exception_message(info: Any) -> str:
    """GX reports evaluation errors either flat or keyed by metric: find the first message."""
    if not info:
        return ""
    if isinstance(info, dict) and info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    if isinstance(info, dict):
        for value in info.values():
            message = _exception_message(value) if isinstance(value, dict) else ""
            if not message and getattr(value, "raised_exception", False):
                message = str(getattr(value, "exception_message", "error"))
            if message:
                return message
    return ""


def new_context(gx, data_docs_dir: Path | None):
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # In memory, with no default docs site (it would point at a temporary directory).
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        # GX draws tqdm bars on stderr for every validation: keep CLI and test output clean.
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    if data_docs_dir is not None:
        context.add_data_docs_site(
            site_name=DATA_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def _run_suite(gx, context, source, suite: Suite, max_examples: int) -> list[RuleFailure]:
    for n, rule in enumerate(suite.rules):
        rule.expectation.meta = {"rule_key": n, "rule": rule.name, "table": suite.table}
        rule.expectation.description = f"{suite.table}: {rule.name}"
    # Expectations go in with the suite: adding them one by one re-saves the suite each time.
    gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name, expectations=[r.expectation for r in suite.rules]))
    batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe(suite.name)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=gx_suite))
    result = definition.run(batch_parameters={"dataframe": suite.frame}, result_format="COMPLETE")
    return _failures_of(suite, result, max_examples)


def run_suites(gx, context, source_name: str, suites: list[Suite], max_examples: int) -> list[RuleFailure]:
    source = context.data_sources.add_pandas(source_name)
    failures: list[RuleFailure] = []
    for suite in suites:
        if suite.rules:
            failures += _run_suite(gx, context, source, suite, max_examples)
    return failures


def validate_dataset(root: Path, cfg: ValidateConfig, report_dir: Path | None = None) -> ValidationResult:
    """Validate the dataset at `root` against the interchange format.

    Returns the result whether or not the dataset passed (call `raise_if_failed()` to stop
    a pipeline). With `report_dir` (the CLI and DVC stage pass `cfg.report_dir`), writes
    `validation.json`, `validation.md` and Great Expectations Data Docs under `data_docs/`.
    A missing or unreadable parquet file raises `DatasetFormatError` naming the file.
    """
    started = time.perf_counter()
    root = Path(root)
    dataset = read_dataset(root, strict=False)
    import_started = time.perf_counter()
    import great_expectations as gx  # slow (~3-5 s the first time): only when a validation runs

    import_seconds = time.perf_counter() - import_started
    data_docs_dir = None
    if report_dir is not None:
        data_docs_dir = Path(report_dir).resolve() / DATA_DOCS_DIR
        if data_docs_dir.exists():
            shutil.rmtree(data_docs_dir)  # stale pages of an earlier run would mix into the index
        data_docs_dir.mkdir(parents=True)
    context = new_context(gx, data_docs_dir)

    ads, queries, qrels = dataset.ads, dataset.queries, dataset.qrels
    suites = [_ads_suite(gx, ads), _queries_suite(gx, queries), _qrels_suite(gx, qrels)]
    images_suite, image_stats = _images_suite(gx, root, ads, cfg)
    if images_suite is not None:
        suites.append(images_suite)
    splits_suite = _splits_suite(gx, ads, queries, qrels)
    suites += [_cross_table_suite(gx, ads, queries, qrels), splits_suite]

    expectations_started = time.perf_counter()
    failures = run_suites(gx, context, "alignsearch_dataset", suites, cfg.max_examples)
    stats: dict[str, dict[str, Any]] = {
        "ads": _table_stats(ads), "queries": _table_stats(queries), "qrels": _table_stats(qrels),
        "images": image_stats,
        "splits": {row["split"]: {k: v for k, v in row.items() if k != "split"}
                   for row in splits_suite.frame.to_dict(orient="records")},
        "timing": {
            "gx_import_seconds": round(import_seconds, 3),
            "images_seconds": image_stats.get("seconds", 0.0),
            "expectations_seconds": round(time.perf_counter() - expectations_started, 3),
        },
    }
    result = ValidationResult(
        root=root, success=not failures, failures=failures, stats=stats, seconds=0.0,
        num_rules=sum(len(s.rules) for s in suites))
    if data_docs_dir is not None:
        context.build_data_docs(site_names=[DATA_DOCS_SITE])
        result.report_paths = {
            "json": Path(report_dir) / JSON_REPORT,
            "markdown": Path(report_dir) / MARKDOWN_REPORT,
            "data_docs": data_docs_dir / "index.html",
        }
    result.seconds = round(time.perf_counter() - started, 3)
    if data_docs_dir is not None:
        result.report_paths["markdown"].write_text(_markdown_report(result))
        result.report_paths["json"].write_text(json.dumps(result.report_dict(), indent=2, default=str) + "\n")
    log.info("validated %s in %.1f s: %s", root, result.seconds,
             "ok" if result.success else f"{len(failures)} rule(s) failed")
    return result


def validate_ads(root: Path, ads: pd.DataFrame, cfg: ValidateConfig,
                 extra_failures: list[RuleFailure] = ()) -> ValidationResult:
    """The ads-table and images rules alone, on `ads` whose image paths are relative to `root`
    (a folder of new ads for the live catalogue: no queries or qrels, so the query, qrels,
    cross-table and split rules do not apply). `extra_failures`: the caller's own findings,
    reported with the rest."""
    started = time.perf_counter()
    import great_expectations as gx  # slow (~3-5 s the first time): only when a validation runs

    context = new_context(gx, None)
    suites = [_ads_suite(gx, ads)]
    images_suite, image_stats = _images_suite(gx, Path(root), ads, cfg)
    if images_suite is not None:
        suites.append(images_suite)
    failures = run_suites(gx, context, "alignsearch_new_ads", suites, cfg.max_examples) + list(extra_failures)
    empty = {"rows": 0, "columns": []}
    stats = {"ads": _table_stats(ads), "queries": empty, "qrels": empty, "images": image_stats}
    return ValidationResult(root=Path(root), success=not failures, failures=failures, stats=stats,
                            seconds=round(time.perf_counter() - started, 3),
                            num_rules=sum(len(s.rules) for s in suites))


# --------------------------------------------------------------------------- reports


def _failure_line(failure: RuleFailure) -> str:
    line = f"{failure.table}: {failure.rule}"
    if failure.note:
        return f"{line} — {failure.note}"
    rows = f"{failure.count} row{'' if failure.count == 1 else 's'}"
    examples = [
        repr(ex) + (f" ({detail})" if detail else "")
        for ex, detail in zip(failure.examples, failure.details or [""] * len(failure.examples), strict=False)
    ]
    return f"{line} — {rows}, e.g. {', '.join(examples)}" if examples else f"{line} — {rows}"


def format_report(result: ValidationResult) -> str:
    """A short human-readable report: the verdict, then one line per failed rule with examples."""
    images = result.stats.get("images") or {}
    scope = (f"{result.stats['ads']['rows']} ads, {result.stats['queries']['rows']} queries, "
             f"{result.stats['qrels']['rows']} qrels, {images.get('files', 0)} images")
    if result.success:
        return f"{result.root}: valid — {result.num_rules} rules passed on {scope} in {result.seconds:.1f} s"
    lines = [f"{result.root}: INVALID — {len(result.failures)} of {result.num_rules} rules failed "
             f"on {scope} in {result.seconds:.1f} s"]
    lines += [f"  {_failure_line(f)}" for f in result.failures]
    return "\n".join(lines)


def _timing_note(result: ValidationResult) -> str:
    timing = result.stats.get("timing") or {}
    if not timing:
        return ""
    return (f" (Great Expectations import {timing['gx_import_seconds']:.1f} s, "
            f"images {timing['images_seconds']:.1f} s, expectations {timing['expectations_seconds']:.1f} s)")


def _markdown_report(result: ValidationResult) -> str:
    lines = [f"# Dataset validation: {'passed' if result.success else 'FAILED'}", "",
             f"- dataset: `{result.root}`",
             f"- rules: {result.num_rules} checked, {len(result.failures)} failed",
             f"- time: {result.seconds:.2f} s{_timing_note(result)}", ""]
    if result.failures:
        lines += ["## Failed rules", ""] + [f"- {_failure_line(f)}" for f in result.failures] + [""]
    lines += ["## Tables", "", "| table | rows | per split |", "|---|---|---|"]
    for name in ("ads", "queries", "qrels"):
        table = result.stats[name]
        splits = ", ".join(f"{k}: {v}" for k, v in (table.get("splits") or {}).items())
        lines.append(f"| {name} | {table['rows']} | {splits} |")
    images = result.stats.get("images") or {}
    if images:
        lines += ["", f"Images: {images['files']} files, {images['missing']} missing, {images['linked']} through "
                      f"symlinks, {images['undecodable']} undecodable, {images['too_large']} with too many pixels, "
                      f"smallest side {images['min_side']} px, "
                      f"checked in {images['seconds']:.2f} s with {images['workers']} threads."]
    if "data_docs" in result.report_paths:
        lines += ["", f"Great Expectations Data Docs: `{result.report_paths['data_docs']}`"]
    return "\n".join(lines) + "\n"
