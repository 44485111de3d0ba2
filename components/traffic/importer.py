"""`traffic import`: a team's own impressions and clicks, exported from their ad server, into the
traffic log. This module owns the import file's schema, its validation and its conversion to
log events (docs/traffic.md#importing-a-teams-own-logs).

The file is long: one row per ad shown (`kind` = impression) or clicked (`kind` = click).
Great Expectations checks every rule before anything is written, in two suites: the schema
(columns, types, positions), then, once the schema holds, the events (unknown ads, clicks with
no impression, times in the future, repeated events, floods). Each rule is an expectation on a
per-row fact column, so a failure names the file's rows. One failed rule: nothing is written.
Writing is one `EventStore.append` (one transaction); an event the log already holds is skipped,
so importing the same file twice adds nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from components.data.format import ADS_FILE, DatasetFormatError
from components.data.validate import Rule, RuleFailure, Suite, isnull, new_context, run_suites
from components.traffic.config import TrafficConfig
from components.traffic.events import (
    IMPRESSIONS,
    Click,
    EventCounts,
    EventStore,
    Hit,
    Impression,
    impression_from_row,
)

log = logging.getLogger(__name__)

FileFormat = Literal["csv", "parquet", "jsonl"]
SUFFIXES: dict[str, FileFormat] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
                                   ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
Kind = Literal["impression", "click"]
KINDS: tuple[str, ...] = get_args(Kind)

# The import file's columns. Required on every row:
REQUIRED_COLUMNS = ("kind", "event_id", "time", "ad_id")
# Required on impression rows (a clicks-only file may leave them out):
IMPRESSION_REQUIRED = ("query", "position")
# Optional: numbers of an impression, and text fields of an impression (session_id on clicks too).
OPTIONAL_NUMBERS = ("score", "k", "took_ms")
OPTIONAL_TEXT = {"session_id": 200, "model_name": 200, "model_version": 64, "catalogue_version": 64}
MAX_ID_CHARS = 200  # the log's id columns
# Fields every row of one impression must agree on (one search has one time, query, ...).
IMPRESSION_FIELDS = ("time", "query", "k", "took_ms", "session_id", "model_name", "model_version", "catalogue_version")

_STORE_LOOKUP_CHUNK = 500  # event ids per SQL `IN (...)`


class ImportFileError(ValueError):
    """A file that cannot be read as an import file at all (format, encoding, not a table)."""


@dataclasses.dataclass
class ImportResult:
    """What an import checked and wrote. `failures` empty: valid, and `added` was written."""

    path: Path
    rows: int
    impressions: int  # searches in the file
    clicks: int  # click rows in the file
    failures: list[RuleFailure]
    num_rules: int
    added: EventCounts = EventCounts(0, 0)
    seconds: float = 0.0

    @property
    def success(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.rows, "impressions": self.impressions, "clicks": self.clicks,
                "success": self.success, "num_rules": self.num_rules, "added": self.added._asdict(),
                "failures": [dataclasses.asdict(f) for f in self.failures], "seconds": self.seconds}


# --- reading the file ----------------------------------------------------------------------

def file_format(path: Path, given: str | None = None) -> FileFormat:
    """`given`, else the format the file's extension names."""
    if given is not None:
        if given not in get_args(FileFormat):
            raise ImportFileError(f"{path}: unknown format {given!r} (csv, parquet or jsonl)")
        return given  # type: ignore[return-value]
    found = SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise ImportFileError(f"{path}: cannot tell the format from the extension {Path(path).suffix!r} "
                              f"({', '.join(SUFFIXES)}); pass --format csv|parquet|jsonl")
    return found


def read_import_file(path: Path, fmt: FileFormat | None = None) -> pd.DataFrame:
    """The file's rows in file order (index 0..n-1: row n+1 of the file). CSV cells are read as
    text (an empty cell is null); Parquet and JSON lines keep their types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    fmt = file_format(path, fmt)
    try:
        if fmt == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        elif fmt == "parquet":
            frame = pd.read_parquet(path)
        elif path.stat().st_size == 0:
            frame = pd.DataFrame()
        else:
            frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except Exception as exc:  # pandas and pyarrow raise many types for a malformed file
        raise ImportFileError(f"{path}: not a readable {fmt} file ({type(exc).__name__}: {exc})") from exc
    frame.columns = [str(c) for c in frame.columns]
    return frame.astype(object).where(frame.notna(), None).reset_index(drop=True)


def known_ad_ids(dataset_dir: Path) -> set[str]:
    """The ad ids of a dataset (its ads.parquet): the ads an imported event may name."""
    path = Path(dataset_dir) / ADS_FILE
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file not found (traffic import checks ad ids against the dataset's ads)")
    try:
        return set(pd.read_parquet(path, columns=["ad_id"])["ad_id"].astype(str))
    except Exception as exc:  # pyarrow raises several types for a corrupt file or a missing column
        raise DatasetFormatError(f"{path}: cannot read its ad_id column ({exc})") from exc


# --- values ----------------------------------------------------------------------------------

def _text(value: Any, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Non-empty text of at most `max_chars` (an integer id such as 42 reads as "42"), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        value = str(int(value))
    if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
        return None
    return value


def _integer(value: Any) -> int | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):  # CSV: "3", or "3.0" as pandas writes an integer column with gaps
        number = _number(value)
        return int(number) if number is not None and number.is_integer() else None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float | np.integer | np.floating) and math.isfinite(float(value)):
        return float(value)
    return None


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time (text) or a timestamp (Parquet), in UTC; a time without a zone is UTC."""
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    elif isinstance(value, pd.Timestamp):
        parsed = value.to_pydatetime(warn=False)
    elif isinstance(value, dt.datetime):
        parsed = value
    else:
        return None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)


def _click_id(event_id: str, ad_id: str) -> str:
    """A click's id from what identifies it (a search and an ad): the same on every import."""
    return "import-" + hashlib.sha256(f"{event_id}\x00{ad_id}".encode()).hexdigest()[:32]


def _query_key(query: str) -> str:
    return " ".join(query.casefold().split())


# --- the rows, normalised ---------------------------------------------------------------------

@dataclasses.dataclass
class _Rows:
    """Per-row values as the log takes them; None where a value is absent or invalid."""

    kind: list[str | None]
    event_id: list[str | None]
    ad_id: list[str | None]
    time: list[dt.datetime | None]
    query: list[str | None]
    position: list[int | None]
    k: list[int | None]
    score: list[float | None]
    took_ms: list[float | None]
    text: dict[str, list[str | None]]

    def impressions(self) -> list[int]:
        return [i for i, kind in enumerate(self.kind) if kind == "impression"]

    def clicks(self) -> list[int]:
        return [i for i, kind in enumerate(self.kind) if kind == "click"]

    def field(self, name: str, i: int) -> Any:
        return self.text[name][i] if name in self.text else getattr(self, name)[i]


def _normalise(frame: pd.DataFrame) -> _Rows:
    kinds = [v.strip().lower() if isinstance(v, str) and v.strip().lower() in KINDS else None
             for v in _column(frame, "kind")]
    return _Rows(
        kind=kinds,
        event_id=[_text(v) for v in _column(frame, "event_id")],
        ad_id=[_text(v) for v in _column(frame, "ad_id")],
        time=[_time(v) for v in _column(frame, "time")],
        query=[v if isinstance(v, str) and v.strip() else None for v in _column(frame, "query")],
        position=[_integer(v) for v in _column(frame, "position")],
        k=[_integer(v) for v in _column(frame, "k")],
        score=[_number(v) for v in _column(frame, "score")],
        took_ms=[_number(v) for v in _column(frame, "took_ms")],
        text={name: [_text(v, n) for v in _column(frame, name)] for name, n in OPTIONAL_TEXT.items()},
    )


# --- the schema suite ----------------------------------------------------------------------------

def _row_id(_frame: pd.DataFrame, i: int) -> str:
    return f"row {i + 1}"


def _fact(values: list[Any]) -> pd.Series:
    return pd.Series(values, dtype=object)


def _schema_suite(gx, frame: pd.DataFrame, rows: _Rows, table: str) -> Suite:
    E = gx.expectations
    raw = frame.copy()
    suite = Suite("import_schema", table, raw, _row_id)
    suite.data_columns = list(frame.columns)
    is_impression = [kind == "impression" for kind in rows.kind]
    n = len(frame)

    def rule(name: str, column: str, fact: str, values: list[Any], show: tuple[str, ...] = ()) -> None:
        raw[fact] = _fact(values)
        suite.rules.append(Rule(name, column, E.ExpectColumnValuesToBeInSet(column=fact, value_set=[True]),
                                 show=tuple(c for c in show if c in raw.columns)))

    for column in REQUIRED_COLUMNS:
        if column not in frame.columns:
            suite.rules.append(Rule(f"required column '{column}' must be present", column,
                                     E.ExpectColumnToExist(column=column)))
    if "kind" in frame.columns:
        rule("kind must be impression or click", "kind", "kind_ok", [k is not None for k in rows.kind], ("kind",))
    for column in ("event_id", "ad_id"):
        if column in frame.columns:
            rule(f"{column} must be text of 1-{MAX_ID_CHARS} characters (or an integer)", column, f"{column}_ok",
                 [v is not None for v in getattr(rows, column)], (column,))
    if "time" in frame.columns:
        rule("time must be an ISO 8601 time (UTC when it has no zone)", "time", "time_ok",
             [t is not None for t in rows.time], ("time",))
    rule("an impression row must have a query (non-empty text)", "query", "query_ok",
         [(q is not None) if imp else None for q, imp in zip(rows.query, is_impression, strict=True)], ("query",))
    rule("an impression row must have a position, an integer >= 1", "position", "position_ok",
         [(p is not None and p >= 1) if imp else None for p, imp in zip(rows.position, is_impression, strict=True)],
         ("position",))
    raw_k, raw_score, raw_took = _column(frame, "k"), _column(frame, "score"), _column(frame, "took_ms")
    rule("k, when given, must be an integer >= every position of its impression", "k", "k_ok",
         [None if not imp or isnull(raw_k[i]) else
          (rows.k[i] is not None and rows.k[i] >= 1 and (rows.position[i] is None or rows.k[i] >= rows.position[i]))
          for i, imp in enumerate(is_impression)], ("k", "position"))
    rule("score, when given, must be a finite number", "score", "score_ok",
         [None if isnull(raw_score[i]) else rows.score[i] is not None for i in range(n)], ("score",))
    rule("took_ms, when given, must be a number >= 0", "took_ms", "took_ms_ok",
         [None if isnull(raw_took[i]) else (rows.took_ms[i] is not None and rows.took_ms[i] >= 0) for i in range(n)],
         ("took_ms",))
    for name, max_chars in OPTIONAL_TEXT.items():
        raw_values = _column(frame, name)
        rule(f"{name}, when given, must be text of 1-{max_chars} characters", name, f"{name}_ok",
             [None if isnull(raw_values[i]) else rows.text[name][i] is not None for i in range(n)], (name,))
    # One search has one time, query, k, ...: its rows must say the same.
    first: dict[str, int] = {}
    agrees: list[bool | None] = [None] * n
    differs: list[str | None] = [None] * n
    for i in rows.impressions():
        event_id = rows.event_id[i]
        if event_id is None:
            continue
        j = first.setdefault(event_id, i)
        other = [f for f in IMPRESSION_FIELDS if rows.field(f, i) != rows.field(f, j)]
        agrees[i] = not other
        differs[i] = f"{', '.join(other)} differ from row {j + 1}" if other else None
    raw["impression_differs"] = _fact(differs)
    rule(f"rows of one impression (event_id) must agree on {', '.join(IMPRESSION_FIELDS)}", "event_id",
         "impression_agrees", agrees, ("event_id", "impression_differs"))
    return suite


# --- the events suite -----------------------------------------------------------------------------

def _logged_impressions(store: EventStore, event_ids: Collection[str]) -> dict[str, Impression]:
    """The impressions the log already holds among `event_ids` (one query per chunk)."""
    import sqlalchemy as sa

    found: dict[str, Impression] = {}
    ids = sorted(set(event_ids))
    with store.engine.connect() as conn:
        for start in range(0, len(ids), _STORE_LOOKUP_CHUNK):
            chunk = ids[start:start + _STORE_LOOKUP_CHUNK]
            for row in conn.execute(sa.select(IMPRESSIONS).where(IMPRESSIONS.c.event_id.in_(chunk))):
                found[row.event_id] = impression_from_row(row)
    return found


def _file_impressions(rows: _Rows) -> dict[str, Impression]:
    """The file's impressions (its rows valid by the schema), by event id, hits in position order."""
    grouped: dict[str, list[int]] = defaultdict(list)
    for i in rows.impressions():
        grouped[rows.event_id[i]].append(i)
    out = {}
    for event_id, members in grouped.items():
        first = members[0]
        hits = tuple(sorted((Hit(rows.ad_id[i], rows.position[i], rows.score[i] if rows.score[i] is not None else 0.0)
                             for i in members), key=lambda h: h.position))
        out[event_id] = Impression(
            event_id=event_id, query=rows.query[first], k=rows.k[first] or max(h.position for h in hits), hits=hits,
            model_name=rows.text["model_name"][first], model_version=rows.text["model_version"][first],
            catalogue_version=rows.text["catalogue_version"][first], source="import", time=rows.time[first],
            took_ms=rows.took_ms[first])
    return out


def _same_content(logged: Impression, imported: Impression, store: EventStore) -> bool:
    """Whether `imported` is the search `logged` already holds (its query as the log writes it;
    where it came from does not matter)."""
    as_logged = dataclasses.replace(imported, query=store.redact(imported.query), source=logged.source,
                                    contributors=logged.contributors)
    return as_logged == logged


def _events_suite(gx, frame: pd.DataFrame, rows: _Rows, table: str, *, store: EventStore, cfg: TrafficConfig,
                  ad_ids: Collection[str], ads_source: str, now: dt.datetime) -> tuple[Suite, dict[str, Impression]]:
    E = gx.expectations
    raw = frame.copy()
    suite = Suite("import_events", table, raw, _row_id)
    suite.data_columns = list(frame.columns)
    n = len(frame)
    in_file = _file_impressions(rows)
    logged = _logged_impressions(store, [e for e in rows.event_id if e is not None])

    def rule(name: str, column: str, fact: str, values: list[Any], show: tuple[str, ...] = ()) -> None:
        raw[fact] = _fact(values)
        suite.rules.append(Rule(name, column, E.ExpectColumnValuesToBeInSet(column=fact, value_set=[True]),
                                 show=tuple(c for c in show if c in raw.columns)))

    known = set(ad_ids)
    rule(f"ad_id must be an ad of the dataset ({ads_source})", "ad_id", "ad_known",
         [a in known for a in rows.ad_id], ("ad_id",))

    def shown_by(event_id: str) -> Impression | None:
        return in_file.get(event_id) or logged.get(event_id)

    clicks = rows.clicks()
    has_impression: list[bool | None] = [None] * n
    for i in clicks:
        impression = shown_by(rows.event_id[i])
        has_impression[i] = impression is not None and impression.hit(rows.ad_id[i]) is not None
    rule("a click must refer to an impression that showed its ad (event_id and ad_id, in the file or the log)",
         "event_id", "click_has_impression", has_impression, ("event_id", "ad_id"))

    latest = now + dt.timedelta(seconds=cfg.import_clock_skew_s)
    rule(f"time must not be in the future (after {latest.isoformat(timespec='seconds')}: "
         f"now + traffic.import_clock_skew_s)", "time", "time_not_future", [t <= latest for t in rows.time], ("time",))

    # Repeated events: an impression's (event_id, position) or (event_id, ad_id), or a click, twice
    # in the file; or an impression the log holds with other content.
    seen: dict[tuple[str, ...], int] = {}
    duplicate_of: list[str | None] = [None] * n
    for i in range(n):
        keys = ([("impression", rows.event_id[i], "position", str(rows.position[i])),
                 ("impression", rows.event_id[i], "ad", rows.ad_id[i])] if rows.kind[i] == "impression"
                else [("click", rows.event_id[i], rows.ad_id[i])])
        for key in keys:
            if key in seen:
                duplicate_of[i] = f"repeats row {seen[key] + 1}"
                break
            seen[key] = i
        if duplicate_of[i] is None and rows.kind[i] == "impression":
            before = logged.get(rows.event_id[i])
            if before is not None and not _same_content(before, in_file[rows.event_id[i]], store):
                duplicate_of[i] = f"event_id logged already ({before.source}) with other content"
    raw["duplicate_of"] = _fact(duplicate_of)
    rule("event ids must not repeat: an impression's (event_id, position) or (event_id, ad_id), or a click, "
         "twice in the file, or an impression the log holds with other content", "event_id", "not_duplicate",
         [d is None for d in duplicate_of], ("event_id", "ad_id", "duplicate_of"))

    # Floods: clicks per session (or per query, where the file has no session for the click).
    session_of: list[str | None] = [None] * n
    sessions = {i: rows.text["session_id"][i] for i in rows.impressions()}
    first_row = {}
    for i in rows.impressions():
        first_row.setdefault(rows.event_id[i], i)
    for i in clicks:
        impression = shown_by(rows.event_id[i])
        session = rows.text["session_id"][i]
        if session is None and rows.event_id[i] in first_row:
            session = sessions[first_row[rows.event_id[i]]]
        if session is not None:
            session_of[i] = f"session {session}"
        elif impression is not None:
            session_of[i] = f"query {_query_key(impression.query)!r}"
    counts = Counter(s for s in session_of if s is not None)
    raw["clicks_of"] = _fact([f"{counts[s]} clicks in {s}" if s is not None else None for s in session_of])
    rule(f"one session (or query, without session_id) must have at most {cfg.import_max_clicks} clicks "
         "(traffic.import_max_clicks)", "session_id", "not_a_flood",
         [None if s is None else counts[s] <= cfg.import_max_clicks for s in session_of], ("clicks_of",))
    return suite, {**logged, **in_file}


# --- the import ---------------------------------------------------------------------------------------

def _to_events(rows: _Rows, impressions: dict[str, Impression]) -> list[Impression | Click]:
    events: list[Impression | Click] = [impressions[e] for e in dict.fromkeys(rows.event_id[i] for i in rows.impressions())]
    for i in rows.clicks():
        event_id, ad_id = rows.event_id[i], rows.ad_id[i]
        events.append(Click(click_id=_click_id(event_id, ad_id), request_id=event_id, ad_id=ad_id,
                            position=impressions[event_id].hit(ad_id).position, time=rows.time[i]))
    return events


def import_events(path: Path, store: EventStore, cfg: TrafficConfig, *, ad_ids: Collection[str],
                  fmt: FileFormat | None = None, ads_source: str = ADS_FILE, now: dt.datetime | None = None,
                  max_examples: int = 20) -> ImportResult:
    """Validate the import file at `path` (format `fmt`, else by extension) and, when every rule
    holds, write its impressions and clicks to `store` in one transaction (`source="import"`).

    `ad_ids`: the ads an event may name (`known_ad_ids` of the dataset); `ads_source` names them
    in the report. `now`: the clock for the future-time rule (UTC now). Returns the result
    whether or not the file passed; on any failure nothing is written."""
    started = time.perf_counter()
    path = Path(path)
    frame = read_import_file(path, fmt)
    rows = _normalise(frame)
    table = path.name
    result = ImportResult(path=path, rows=len(frame), impressions=len({rows.event_id[i] for i in rows.impressions()}),
                          clicks=len(rows.clicks()), failures=[], num_rules=0)
    import great_expectations as gx  # slow (~3-5 s the first time): only when an import runs

    context = new_context(gx, None)
    schema = _schema_suite(gx, frame, rows, table)
    result.failures = run_suites(gx, context, "alignsearch_import_schema", [schema], max_examples)
    result.num_rules = len(schema.rules)
    if result.success:  # the event rules read valid values only
        events, impressions = _events_suite(gx, frame, rows, table, store=store, cfg=cfg, ad_ids=ad_ids,
                                            ads_source=ads_source, now=now or dt.datetime.now(dt.UTC))
        result.failures = run_suites(gx, context, "alignsearch_import_events", [events], max_examples)
        result.num_rules += len(events.rules)
        if result.success:
            result.added = store.append(_to_events(rows, impressions))
    result.seconds = round(time.perf_counter() - started, 3)
    log.info("import %s: %s", path, f"added {result.added}" if result.success
             else f"{len(result.failures)} rule(s) failed, nothing written")
    return result


def format_import_report(result: ImportResult) -> str:
    """The verdict, then one line per failed rule naming its rows (row 1 = the file's first event)."""
    scope = f"{result.rows} rows ({result.impressions} searches, {result.clicks} clicks)"
    if result.success:
        added = result.added
        return (f"{result.path}: valid — {result.num_rules} rules passed on {scope}; added {added.impressions} "
                f"searches and {added.clicks} clicks ({result.impressions - added.impressions} searches and "
                f"{result.clicks - added.clicks} clicks were logged already)")
    lines = [f"{result.path}: REFUSED, nothing imported — {len(result.failures)} of {result.num_rules} rules "
             f"failed on {scope}"]
    for failure in result.failures:
        if failure.note:
            lines.append(f"  {failure.rule} — {failure.note}")
            continue
        named = [ex + (f" ({detail})" if detail else "")
                 for ex, detail in zip(failure.examples, failure.details or [""] * len(failure.examples), strict=False)]
        more = failure.count - len(named)
        lines.append(f"  {failure.rule} — {failure.count} row{'' if failure.count == 1 else 's'}: "
                     f"{', '.join(named)}{f', and {more} more' if more > 0 else ''}")
    return "\n".join(lines)
