"""The traffic log: every answered search (an impression) and every click on one, append-only.
This module owns the log's records, its tables, and its Parquet export.

Why SQLAlchemy Core over SQLite (WAL) by default and PostgreSQL for a team:
- The log is many small appends from one or more service processes, read in bulk by ingest
  and reports. SQLite in WAL mode is in the standard library, needs no server, lets readers
  run beside the writer, and lets several processes append to one file: a writer waits for
  another's transaction (`busy_timeout_s`) instead of failing. DuckDB, the other embedded
  candidate, refuses a second writer process, and `alignsearch serve` may run several.
  Partitioned Parquet alone has no transactions, no unique keys and no in-place deletes, all
  of which the log needs (idempotent imports, retention, click lookups by request id).
- The same Core code runs on PostgreSQL (`traffic.store_uri: postgresql://...`), which the
  team stack already runs: every service replica appends to one database.
- Past one database, `EventStore.export_parquet` writes a time range as date-partitioned
  Parquet (a local directory or any pyarrow filesystem URI, e.g. the team stack's S3), and
  `read_exported` reads it back in the same frames the store gives.

Keys and order: an impression's `event_id` (the response's request id) and a click's
`click_id` are unique, and a click is unique per (request id, ad id); writes skip rows that
would repeat one, so importing the same events twice adds nothing. Each table also has a
`seq` primary key that grows in commit order: SQLite allows one writer at a time, and on
PostgreSQL every write transaction first takes one advisory lock, so a reader that remembers
the last `seq` it saw (a `Watermark`) never skips a row that committed late. A write
(`append`) is one transaction: a crash leaves the whole batch or none of it.

Times are UTC, stored as integer microseconds since the epoch (exact, and the same on both
engines); the frames and the Parquet files carry them as UTC timestamps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from components.outputs import atomic_file, redact_uri
from components.traffic.config import Redaction, TrafficConfig

log = logging.getLogger(__name__)

ImpressionSource = Literal["api", "page", "import"]

# Writers on PostgreSQL serialise on this advisory lock (any constant; "alignsearch traffic").
_PG_WRITE_LOCK = 0x616C_7472


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    """A fresh event or click id (the service's request ids are the same form: uuid4 hex)."""
    return uuid.uuid4().hex


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """One ranked result of an impression; `position` counts from 1."""

    ad_id: str
    position: int
    score: float


@dataclasses.dataclass(frozen=True, slots=True)
class Impression:
    """An answered search: what was asked, by which model, and what it showed in which order."""

    event_id: str
    query: str
    k: int
    hits: tuple[Hit, ...]
    model_name: str | None = None
    model_version: str | None = None
    catalogue_version: str | None = None
    source: ImpressionSource = "api"
    time: dt.datetime = dataclasses.field(default_factory=utc_now)
    # Interleaving (issue 21): per position, the model that contributed the hit; None otherwise.
    contributors: tuple[str, ...] | None = None
    # How long the service took to answer (ms, as its response says); None when not measured
    # (an imported ad-server log, a log written before the column existed).
    took_ms: float | None = None

    def hit(self, ad_id: str) -> Hit | None:
        return next((h for h in self.hits if h.ad_id == ad_id), None)


@dataclasses.dataclass(frozen=True, slots=True)
class Click:
    """A click on an ad an impression showed, at the position it showed it (checked by
    `clicks.check_click` before it is written)."""

    click_id: str
    request_id: str
    ad_id: str
    position: int
    time: dt.datetime = dataclasses.field(default_factory=utc_now)


Event = Impression | Click


# --- redaction of query text -------------------------------------------------------------

def _hash_query(text: str) -> str:
    # Case and spacing first, so a query's variants still group together. A pseudonym, not
    # anonymity: an unsalted hash of a common query is found by hashing candidate queries.
    return "sha256:" + hashlib.sha256(" ".join(text.casefold().split()).encode()).hexdigest()[:16]


def _drop_digits(text: str) -> str:
    # Phone, card and order numbers typed into a search box.
    return " ".join(re.sub(r"\d+", " ", text).split())


REDACTIONS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "hash": _hash_query,
    "drop-digits": _drop_digits,
}
assert set(REDACTIONS) == set(get_args(Redaction)), "config.Redaction and REDACTIONS name the same redactions"


# --- tables --------------------------------------------------------------------------------

METADATA = sa.MetaData()
# SQLite's AUTOINCREMENT needs INTEGER PRIMARY KEY (never reuses a number, even after
# retention deleted the newest rows); PostgreSQL gets a BIGSERIAL.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

IMPRESSIONS = sa.Table(
    "impressions", METADATA,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(200), nullable=False, unique=True),
    sa.Column("time_us", sa.BigInteger, nullable=False, index=True),
    sa.Column("query", sa.Text, nullable=False),
    sa.Column("k", sa.Integer, nullable=False),
    sa.Column("model_name", sa.String(200)),
    sa.Column("model_version", sa.String(64)),
    sa.Column("catalogue_version", sa.String(64)),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("hits", _JSON, nullable=False),  # [{"ad_id", "position", "score"}, ...] in rank order
    sa.Column("contributors", _JSON, nullable=True),
    sa.Column("took_ms", sa.Float, nullable=True),
    sqlite_autoincrement=True,
)
CLICKS = sa.Table(
    "clicks", METADATA,
    sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
    sa.Column("click_id", sa.String(200), nullable=False, unique=True),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("ad_id", sa.String(200), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("time_us", sa.BigInteger, nullable=False, index=True),
    sa.UniqueConstraint("request_id", "ad_id", name="clicks_one_per_ad"),
    sqlite_autoincrement=True,
)

IMPRESSION_COLUMNS = ("event_id", "time", "query", "k", "model_name", "model_version", "catalogue_version",
                      "source", "hits", "contributors", "took_ms")
CLICK_COLUMNS = ("click_id", "request_id", "ad_id", "position", "time")


def _to_us(time: dt.datetime) -> int:
    if time.tzinfo is None:
        raise ValueError(f"event time {time} has no time zone (the log is in UTC)")
    return int((time - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1))


def _from_us(value: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(value))


def _impression_row(event: Impression, redact: Callable[[str], str]) -> dict[str, Any]:
    return {"event_id": event.event_id, "time_us": _to_us(event.time), "query": redact(event.query),
            "k": event.k, "model_name": event.model_name, "model_version": event.model_version,
            "catalogue_version": event.catalogue_version, "source": event.source,
            "hits": [{"ad_id": h.ad_id, "position": h.position, "score": float(h.score)} for h in event.hits],
            "contributors": list(event.contributors) if event.contributors is not None else None,
            "took_ms": float(event.took_ms) if event.took_ms is not None else None}


def _click_row(event: Click) -> dict[str, Any]:
    return {"click_id": event.click_id, "request_id": event.request_id, "ad_id": event.ad_id,
            "position": event.position, "time_us": _to_us(event.time)}


def impression_from_row(row: Any) -> Impression:
    """An `Impression` from a stored row (the log's columns, `time_us` and all)."""
    return Impression(
        event_id=row.event_id, query=row.query, k=row.k, model_name=row.model_name,
        model_version=row.model_version, catalogue_version=row.catalogue_version, source=row.source,
        hits=tuple(Hit(str(h["ad_id"]), int(h["position"]), float(h["score"])) for h in row.hits),
        time=_from_us(row.time_us), contributors=tuple(row.contributors) if row.contributors is not None else None,
        took_ms=row.took_ms)


# --- reading -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Watermark:
    """How far a reader has read: the last `seq` seen in each table (0: nothing yet)."""

    impressions: int = 0
    clicks: int = 0


@dataclasses.dataclass
class Events:
    """Impressions and clicks as frames (columns IMPRESSION_COLUMNS / CLICK_COLUMNS, `time` a UTC
    timestamp, `hits` a list of {"ad_id", "position", "score"}); `watermark` is where a reader
    of the store continues (None for events read from a Parquet export)."""

    impressions: pd.DataFrame
    clicks: pd.DataFrame
    watermark: Watermark | None = None


def _frame(rows: list[Any], columns: tuple[str, ...]) -> pd.DataFrame:
    records = [row._asdict() for row in rows]
    frame = pd.DataFrame.from_records(records, columns=["seq", "time_us", *[c for c in columns if c != "time"]])
    frame["time"] = pd.to_datetime(frame["time_us"].astype("int64"), unit="us", utc=True)
    if "took_ms" in frame.columns:  # float with NaN for unmeasured, as a Parquet export reads back
        frame["took_ms"] = frame["took_ms"].astype("float64")
    return frame[["seq", *columns]].reset_index(drop=True)


class EventCounts(NamedTuple):
    """Rows per table: added by a write (rows repeating an event already logged are skipped),
    deleted by retention, or held by the log."""

    impressions: int
    clicks: int


class EventStore:
    """The log in one SQL database, opened from a SQLAlchemy URI (tables created if absent).

    `redact` is applied to every query text before it is written (a name from
    `config.Redaction` or any callable)."""

    def __init__(self, uri: str, *, busy_timeout_s: float = 5.0,
                 redact: Redaction | Callable[[str], str] = "none"):
        self.uri = uri
        self.redact = REDACTIONS[redact] if isinstance(redact, str) else redact
        url = sa.engine.make_url(uri)
        self.dialect = url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"traffic store {redact_uri(uri)!r}: only sqlite:/// and postgresql:// are supported")
        if self.dialect == "sqlite":
            if url.database in (None, "", ":memory:"):
                raise ValueError("the traffic store needs a SQLite file (sqlite:///path.db), not an in-memory database")
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._create_tables()

    @classmethod
    def from_config(cls, cfg: TrafficConfig) -> EventStore:
        return cls(cfg.store_uri, busy_timeout_s=cfg.busy_timeout_s, redact=cfg.redact_queries)

    def __repr__(self) -> str:
        return f"EventStore({redact_uri(self.uri)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create_tables(self, attempts: int = 3) -> None:
        # Several processes open a new log at once (a server's writer processes): each statement
        # says IF NOT EXISTS, where `create_all`'s check-then-create let the later ones fail.
        # PostgreSQL may still refuse one of two concurrent CREATEs (its catalogue's unique
        # index): the next attempt finds the table there.
        for attempt in range(1, attempts + 1):
            try:
                with self.engine.begin() as conn:
                    for table in METADATA.sorted_tables:
                        conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
                        for index in table.indexes:
                            conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
                break
            except sa.exc.DatabaseError:
                if attempt == attempts:
                    raise
                time.sleep(0.05 * attempt)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A log written by an older version lacks the nullable columns added since (`took_ms`):
        added in place, the old rows reading as null. Two processes opening the same old log may
        both try; the one that finds the column there already lets it be."""
        for table in (IMPRESSIONS, CLICKS):
            present = {c["name"] for c in sa.inspect(self.engine).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(f"traffic store {self}: table {table.name} has no column {column.name} "
                                       "and it cannot be added to existing rows (not nullable)")
                kind = column.type.compile(dialect=self.engine.dialect)
                try:
                    with self.engine.begin() as conn:
                        conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                except sa.exc.DatabaseError:
                    if column.name not in {c["name"] for c in sa.inspect(self.engine).get_columns(table.name)}:
                        raise
                log.info("traffic store %s: added column %s.%s", self, table.name, column.name)

    def _begin_write(self, conn: sa.Connection) -> None:
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_WRITE_LOCK})

    def _insert(self, table: sa.Table) -> Any:
        dialect_insert = sqlite.insert if self.dialect == "sqlite" else postgresql.insert
        # No conflict target: a repeated event id, click id or (request id, ad id) is skipped.
        return dialect_insert(table).on_conflict_do_nothing()

    # --- writing

    def append(self, events: Iterable[Event]) -> EventCounts:
        """Write impressions and clicks in ONE transaction; events already in the log are skipped."""
        impressions, clicks = [], []
        for event in events:
            if isinstance(event, Impression):
                impressions.append(_impression_row(event, self.redact))
            elif isinstance(event, Click):
                clicks.append(_click_row(event))
            else:
                raise TypeError(f"not a traffic event: {type(event).__name__}")
        added = {"impressions": 0, "clicks": 0}
        with self.engine.begin() as conn:
            self._begin_write(conn)
            for name, table, rows in (("impressions", IMPRESSIONS, impressions), ("clicks", CLICKS, clicks)):
                if rows:
                    key = table.c.event_id if table is IMPRESSIONS else table.c.click_id
                    added[name] = len(conn.execute(self._insert(table).returning(key), rows).all())
        return EventCounts(**added)

    def insert_click(self, click: Click) -> bool:
        """Write one click now, in its own transaction; False (nothing written) when the log
        already holds a click on that ad of that request (or that click id)."""
        with self.engine.begin() as conn:
            self._begin_write(conn)
            return conn.execute(self._insert(CLICKS), _click_row(click)).rowcount == 1

    def delete_older_than(self, days: float, *, now: dt.datetime | None = None) -> EventCounts:
        """Retention: delete impressions older than `days`, with their clicks, and clicks older
        than `days` (one transaction). Returns the rows deleted."""
        cutoff = _to_us((now or utc_now()) - dt.timedelta(days=days))
        old_impressions = sa.select(IMPRESSIONS.c.event_id).where(IMPRESSIONS.c.time_us < cutoff)
        with self.engine.begin() as conn:
            self._begin_write(conn)
            clicks = conn.execute(sa.delete(CLICKS).where(
                (CLICKS.c.time_us < cutoff) | CLICKS.c.request_id.in_(old_impressions))).rowcount
            impressions = conn.execute(sa.delete(IMPRESSIONS).where(IMPRESSIONS.c.time_us < cutoff)).rowcount
        return EventCounts(impressions=impressions, clicks=clicks)

    # --- reading

    def impression(self, event_id: str) -> Impression | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(IMPRESSIONS).where(IMPRESSIONS.c.event_id == event_id)).first()
        return impression_from_row(row) if row is not None else None

    def clicked(self, request_id: str, ad_id: str) -> bool:
        """Whether the log holds a click on `ad_id` of the search `request_id`."""
        query = sa.select(CLICKS.c.seq).where(CLICKS.c.request_id == request_id, CLICKS.c.ad_id == ad_id)
        with self.engine.connect() as conn:
            return conn.execute(query).first() is not None

    def read(self, since: Watermark = Watermark(), *, start: dt.datetime | None = None,
             end: dt.datetime | None = None, limit: int | None = None) -> Events:
        """Events after `since` (in `seq` order), optionally only those with start <= time < end,
        at most `limit` per table; the result's watermark is where the next read continues."""
        out = {}
        with self.engine.connect() as conn:
            for name, table, columns, after in (("impressions", IMPRESSIONS, IMPRESSION_COLUMNS, since.impressions),
                                                ("clicks", CLICKS, CLICK_COLUMNS, since.clicks)):
                query = sa.select(table).where(table.c.seq > after).order_by(table.c.seq).limit(limit)
                if start is not None:
                    query = query.where(table.c.time_us >= _to_us(start))
                if end is not None:
                    query = query.where(table.c.time_us < _to_us(end))
                out[name] = _frame(conn.execute(query).all(), columns)
        watermark = Watermark(*(int(out[n]["seq"].max()) if len(out[n]) else after
                                for n, after in (("impressions", since.impressions), ("clicks", since.clicks))))
        return Events(out["impressions"], out["clicks"], watermark)

    def counts(self) -> EventCounts:
        with self.engine.connect() as conn:
            return EventCounts(*(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                              for t in (IMPRESSIONS, CLICKS)))

    # --- export

    def export_parquet(self, root: str | Path, start: dt.datetime, end: dt.datetime) -> list[str]:
        """Write the events with start <= time < end as Parquet under `root`, partitioned by
        table and UTC date (`impressions/date=2025-01-31/part-<start>-<end>.parquet`). `root` is
        a directory or a pyarrow filesystem URI (`s3://bucket/traffic?endpoint_override=...`).
        Exporting the same range again rewrites the same files; `read_exported` drops events
        that overlapping ranges wrote twice. Returns the files written."""
        events = self.read(start=start, end=end)
        name = f"part-{_to_us(start)}-{_to_us(end)}.parquet"
        written = []
        for table_name, frame in (("impressions", events.impressions), ("clicks", events.clicks)):
            for date, part in frame.groupby(frame["time"].dt.strftime("%Y-%m-%d"), sort=True):
                written.append(_write_parquet(_arrow_table(table_name, part), root,
                                              f"{table_name}/date={date}/{name}"))
        return written


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers run beside the one writer; FULL: a committed batch survives a power loss too.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def open_store(cfg: TrafficConfig) -> EventStore:
    """The event log `traffic.store_uri` names: the one way the service, ingest and reports open it."""
    return EventStore.from_config(cfg)


# --- Parquet (pyarrow loads when an export is written or read) -----------------------------

def _arrow_schema(table_name: str) -> Any:
    import pyarrow as pa

    time = pa.timestamp("us", tz="UTC")
    if table_name == "clicks":
        return pa.schema([("click_id", pa.string()), ("request_id", pa.string()), ("ad_id", pa.string()),
                          ("position", pa.int32()), ("time", time)])
    hit = pa.struct([("ad_id", pa.string()), ("position", pa.int32()), ("score", pa.float64())])
    return pa.schema([("event_id", pa.string()), ("time", time), ("query", pa.string()), ("k", pa.int32()),
                      ("model_name", pa.string()), ("model_version", pa.string()),
                      ("catalogue_version", pa.string()), ("source", pa.string()),
                      ("hits", pa.list_(hit)), ("contributors", pa.list_(pa.string())), ("took_ms", pa.float64())])


def _arrow_table(table_name: str, frame: pd.DataFrame) -> Any:
    import pyarrow as pa

    schema = _arrow_schema(table_name)
    columns = {name: frame[name].tolist() for name in schema.names}
    columns["time"] = frame["time"].dt.as_unit("us").tolist()
    return pa.table(columns, schema=schema)


def _filesystem(root: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a directory or URI; local paths are made absolute."""
    from pyarrow import fs

    if isinstance(root, Path) or "://" not in root:
        return fs.LocalFileSystem(), str(Path(root).resolve())
    return fs.FileSystem.from_uri(root)


def _write_parquet(table: Any, root: str | Path, relative: str) -> str:
    import pyarrow.parquet as pq

    filesystem, base = _filesystem(root)
    path = f"{base.rstrip('/')}/{relative}"
    if filesystem.type_name == "local":
        with atomic_file(Path(path)) as scratch:  # a killed export leaves no half file
            pq.write_table(table, scratch)
        return path
    with filesystem.open_output_stream(path) as stream:  # an object store's PUT is whole or absent
        pq.write_table(table, stream)
    return f"{filesystem.type_name}://{path}"


def read_exported(root: str | Path) -> Events:
    """The events `export_parquet` wrote under `root` (every date partition), each event once,
    in time order, in the frames `EventStore.read` gives (without `seq`)."""
    import pyarrow.dataset as ds

    filesystem, base = _filesystem(root)
    frames = {}
    for table_name, key, columns in (("impressions", "event_id", IMPRESSION_COLUMNS),
                                     ("clicks", "click_id", CLICK_COLUMNS)):
        path = f"{base.rstrip('/')}/{table_name}"
        if filesystem.get_file_info(path).type.name == "NotFound":
            frame = pd.DataFrame(columns=list(columns))
        else:
            dataset = ds.dataset(path, filesystem=filesystem, format="parquet", partitioning="hive",
                                 schema=_arrow_schema(table_name))
            frame = dataset.to_table(columns=list(columns)).to_pandas()
        frame = frame.astype({"k": "int64"} if table_name == "impressions" else {"position": "int64"})
        if table_name == "impressions" and len(frame):
            frame["hits"] = frame["hits"].map(lambda hits: [dict(h) for h in hits])
            frame["contributors"] = frame["contributors"].map(lambda c: None if c is None else list(c))
        frames[table_name] = (frame.sort_values(["time", key], kind="stable").drop_duplicates(key)
                              .reset_index(drop=True))
    return Events(frames["impressions"], frames["clicks"])
