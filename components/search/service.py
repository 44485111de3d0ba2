"""The HTTP search service: a small FastAPI app over a loaded alignsearch pyfunc model.

Why FastAPI rather than `mlflow models serve`: we want a request schema with limits that
answer 4xx with a message (empty query, k too large, text too long), a response shaped for
search (ranked hits with their visual words), and a health endpoint naming the model version,
all in the same process as the CLI, with no per-model environment to build.

    GET  /health                    -> {"status": "ok", "model_uri": ..., "version": ...,
                                        "catalogue_version": ..., "num_ads": ..., "traffic": {...},
                                        "interleave": {...}} (503: no model)
    GET  /search?q=red+car&k=5      -> {"request_id": ..., "query": ..., "k": ..., "catalogue_version": ...,
                                        "took_ms": ..., "results": [...], "interleaved": false}
                                       (&source=page from the page)
    POST /search {"query": ..., "k": 5, "source": "api"}
    POST /click {"request_id": ..., "ad_id": ...} -> {"click_id", "request_id", "ad_id", "position"}
    GET  /                          -> the search page (`page.py`: one HTML file, no CDN, no build)
    GET  /image?ad_id=...           -> an ad's image (from the catalogue version that holds it), as
                                       the PNG/JPEG/WebP detected in it, nosniff, sandboxed

With an `engine` (the pyfunc's `SearchEngine`) and a `watcher` (`CatalogueWatcher`), the
service follows the model version's live catalogue: a new version is loaded beside the old
one and swapped in, so no request is dropped or answered from a half-loaded catalogue.

With a `search_log` (`SearchLog`; the traffic log, which sits above this layer, is built by
`catalogue.serving`), every answered search is handed to it as an impression named by its
request id (a queue put: the search never waits for the log), and `POST /click` records a
click on an ad a logged search showed; a refused click answers its rule's status with
`{"detail", "reason", "request_id"}` and nothing is written. Without one, nothing is logged and
`/click` answers 404 with reason `logging_off`.

With a `challenger` (a second model on the same catalogue version, built by `catalogue.serving`)
and `serve.interleave_share` > 0, that share of searches (drawn from the request id) is answered
by a team-draft interleaving of the two models' rankings (`search.interleave`), the answer
saying `"interleaved": true` and the logged impression naming, per position, the model that
contributed it (docs/search.md#interleaving).

Behaving like a service: every response carries an `X-Request-ID` (and `nosniff`); an
internal error is a generic 500 naming that id (the traceback goes to the log, not to the
client); bodies over `max_body_bytes` get 413, bodies not received within `body_timeout_s`
408, requests beyond `max_in_flight` at once (per kind: searches, images, the rest; counted
from acceptance, body reading included) 429. With an API key set, every route but the page
needs `X-API-Key: <key>` (or `Authorization: Bearer <key>`), else 401; the page holds no
data and asks for the key. Without a key, only requests whose Host names the bind address
are answered (421 otherwise: DNS rebinding). Concurrent searches are micro-batched into one
model call (`batching.py`, `batch_max`, `batch_wait_ms`).
"""

# No `from __future__ import annotations`: FastAPI must see the request model built inside
# `create_app` (its limits come from the config) as a class, not as a string.
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

import pandas as pd
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from components.data.validate import IMAGE_FORMATS, image_format
from components.outputs import redact_uri
from components.search.batching import MicroBatcher
from components.search.config import ServeConfig
from components.search.interleave import contributor_label, team_draft
from components.search.page import CONTENT_SECURITY_POLICY, PAGE

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# An ad image is the advertiser's file: answered as the image format detected in it (never by
# its name), not sniffed, and if opened on its own, a sandboxed document that loads nothing.
IMAGE_HEADERS = {"Cache-Control": "private, max-age=3600",
                 "Content-Security-Policy": "default-src 'none'; img-src 'self'; sandbox"}


class Hit(BaseModel):
    rank: int
    ad_id: str
    title: str
    score: float
    visual_words: list[str]
    matched_words: list[str]
    words_shown: list[str] = Field(default_factory=list, description="the first visual words, the ones a person "
                                   "judges (align.words_shown)")
    word_regions: dict[str, list[float]] = Field(default_factory=dict, description="shown word -> [x0, y0, x1, y1], "
                                                 "fractions of the image: the part that word came from")
    image_hash: str | None = Field(None, description="sha256 of the ad's image file")
    duplicates: list[str] = Field(default_factory=list, description="ads with a byte-identical image, collapsed "
                                  "into this one")


SearchSource = Literal["api", "page"]


class SearchResponse(BaseModel):
    request_id: str  # also the X-Request-ID header; a click names its search by it
    query: str
    k: int
    model_uri: str
    model_version: str | None = None
    catalogue_version: str | None = None
    took_ms: float
    results: list[Hit]
    interleaved: bool = Field(False, description="true when the results interleave the served model's ranking "
                              "with a second model's (serve.interleave_share)")


def _hits(rows: list[dict]) -> list[Hit]:
    """The answer's hits from the engine's frame rows (`frame.to_dict("records")`); a model
    without the search page's columns (words_shown, word_boxes aligned with it, image_hash,
    duplicates) leaves them empty."""
    def listed(value) -> list:
        return [] if value is None or isinstance(value, float) else list(value)

    hits = []
    for r in rows:
        shown = [str(w) for w in listed(r.get("words_shown"))]
        boxes = listed(r.get("word_boxes"))
        hits.append(Hit(rank=int(r["rank"]), ad_id=str(r["ad_id"]), title=str(r["title"]), score=float(r["score"]),
                        visual_words=[str(w) for w in r["visual_words"]],
                        matched_words=[str(w) for w in r["matched_words"]], words_shown=shown,
                        word_regions={w: [float(v) for v in box] for w, box in zip(shown, boxes, strict=False)
                                      if len(box) == 4},
                        image_hash=r.get("image_hash") or None if isinstance(r.get("image_hash"), str) else None,
                        duplicates=[str(a) for a in listed(r.get("duplicates"))]))
    return hits


class ClickRefused(Exception):
    """A click the log did not record: the HTTP `status` it is answered with and the `reason`
    (a stable name clients and logs can match on) of the rule it broke."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class SearchLog(Protocol):
    """Where the service logs what it answered (the traffic log; `catalogue.serving` builds it).
    `log_search` must not block or raise for the log's sake (a queue put); `click` writes at
    once and raises `ClickRefused`."""

    def log_search(self, *, request_id: str, query: str, k: int, hits: list[tuple[str, int, float]],
                   model_name: str | None, model_version: str | None, catalogue_version: str | None,
                   source: SearchSource, took_ms: float, contributors: list[str] | None = None) -> None:
        """`contributors`: for an interleaved answer, per hit the label of the model that put
        it there (`interleave.contributor_label`, "name/version"); None otherwise."""

    def click(self, request_id: str, ad_id: str) -> dict: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


class Challenger(Protocol):
    """A second model the service interleaves with the served one (`catalogue.serving` builds
    it: its engine ranks the served model's current catalogue). `info` has its `name` and
    `version`; `predict` answers as the served model's does; `describe` is its /health entry."""

    info: dict

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame: ...

    def describe(self) -> dict: ...


def interleave_draw(seed: int, request_id: str) -> float:
    """A number in [0, 1) fixed by the seed and the request id: a search is interleaved when it
    is below `serve.interleave_share` (the same request id always draws the same)."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _same_image_key(row: dict) -> str:
    # Ads with byte-identical images are one result (the engine collapses them, each model
    # into its own best-scoring one): an interleaving shows such an image once too.
    digest = row.get("image_hash")
    return f"image:{digest}" if isinstance(digest, str) and digest else f"ad:{row['ad_id']}"


def interleave_answers(champion: list[dict], challenger: list[dict], k: int, rng: random.Random,
                       labels: tuple[str, str]) -> tuple[list[dict], list[str]]:
    """A team-draft interleaving (`interleave.team_draft`, the champion as team a) of two
    answers (the rows of one query's frames, best first) into at most `k` rows, each row the
    contributing model's own (its score, words and regions), ranks renumbered from 1; and per
    row the label (`labels`: champion's, challenger's) of the model that contributed it.
    Plain dicts, not frames: building a frame per search cost more than the draft itself."""
    rows = {"a": champion, "b": challenger}
    by_key = {team: {_same_image_key(r): r for r in reversed(rs)} for team, rs in rows.items()}
    keys, teams = team_draft([_same_image_key(r) for r in champion], [_same_image_key(r) for r in challenger], k, rng)
    picked = [{**by_key[team][key], "rank": rank}
              for rank, (key, team) in enumerate(zip(keys, teams, strict=True), start=1)]
    return picked, [labels[0] if team == "a" else labels[1] for team in teams]


async def _send_json(send, status: int, body: dict, request_id: str) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
                            (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": payload})


# Without an API key, a loopback service answers only requests that name it: a page on
# rebind.example whose name then resolves to 127.0.0.1 reaches the service from the user's
# browser (DNS rebinding) with `Host: rebind.example`.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(bind: str, port: int) -> frozenset[str] | None:
    """The Host header values a service bound to `bind`:`port` answers when it has no API key;
    None: any (a wildcard bind, 0.0.0.0 or ::, has no one name to check against)."""
    try:
        address = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        address = None
    if bind.lower() == "localhost" or (address is not None and address.is_loopback):
        names: tuple[str, ...] = LOOPBACK_NAMES
    elif address is not None and address.is_unspecified:
        return None
    elif address is not None:
        names = (f"[{address}]" if address.version == 6 else str(address), *LOOPBACK_NAMES)
    else:
        names = (bind.lower(), *LOOPBACK_NAMES)
    return frozenset({f"{name}:{port}" for name in names} | (set(names) if port == 80 else set()))


def _lane(path: str) -> str:
    """Which in-flight count a request joins: searches, images (each may take a download) and
    the rest, each capped at `max_in_flight`."""
    path = path.rstrip("/")
    return path.lstrip("/") if path in ("/search", "/image") else "other"


class _TooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI middleware: request ids, the Host check, the API key, body-size, body-time and
    in-flight limits, and the last word on errors (a generic 500, traceback logged). Runs on the
    event loop, so the in-flight counts need no lock.

    A request counts as in flight from the moment it is accepted until it is answered, its body
    reading included: a client that sends its body slowly holds a place (until
    `body_timeout_s`: 408), so slow clients cannot pile up past the limit unseen."""

    def __init__(self, app, cfg: ServeConfig, api_key: str | None, new_request_id: Callable[[], str]):
        self.app, self.cfg, self.api_key, self.new_request_id = app, cfg, api_key, new_request_id
        self.hosts = None if api_key else allowed_hosts(cfg.host, cfg.port)
        self.in_flight = {"search": 0, "image": 0, "other": 0}

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"").decode("latin-1")
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        return bool(given) and secrets.compare_digest(given.encode(), self.api_key.encode())

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        if self.hosts is not None and headers.get(b"host", b"").decode("latin-1").lower() not in self.hosts:
            return 421, "this service answers only at its own address (the Host header names another)"
        # The page is static (no data in it) and asks for the key; everything else needs it.
        if self.api_key and scope["path"] != "/" and not self._authorised(headers):
            return 401, "missing or wrong API key (header X-API-Key)"
        limit = self.cfg.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return 413, f"request body larger than {limit} bytes"
        return None

    async def _body(self, receive) -> bytes | None:
        """The whole body (small by definition), counted as it arrives: a body sent without
        Content-Length (chunked) is refused as soon as it passes the limit. None: the client left."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.cfg.max_body_bytes:
                raise _TooLarge
        return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = self.new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        headers = dict(scope.get("headers") or [])

        async def refuse(status: int, detail: str) -> None:
            await _send_json(send, status, {"detail": detail, "request_id": request_id}, request_id)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refuse(*refusal)
        lane = _lane(scope["path"])
        if self.in_flight[lane] >= self.cfg.max_in_flight:
            return await refuse(429, f"too many requests in flight (limit {self.cfg.max_in_flight}); retry shortly")
        self.in_flight[lane] += 1
        try:
            try:
                async with asyncio.timeout(self.cfg.body_timeout_s):
                    body = await self._body(receive)
            except TimeoutError:
                return await refuse(408, f"request body not received within {self.cfg.body_timeout_s:g} s")
            except _TooLarge:
                return await refuse(413, f"request body larger than {self.cfg.max_body_bytes} bytes")
            if body is None:
                return  # the client went away
            await self._answer(scope, receive, send, body, request_id)
        finally:
            self.in_flight[lane] -= 1

    async def _answer(self, scope, receive, send, body: bytes, request_id: str) -> None:
        replayed = False
        started = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def tagged_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
                                                  (b"x-content-type-options", b"nosniff")]}
            await send(message)

        try:
            await self.app(scope, replay_receive, tagged_send)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope["path"])
            if not started:
                await _send_json(send, 500, {"detail": "internal error", "request_id": request_id}, request_id)


class ClickRequest(BaseModel):
    request_id: str = Field(..., min_length=1, max_length=200, description="the search's request id "
                            "(its X-Request-ID, also `request_id` in its answer)")
    ad_id: str = Field(..., min_length=1, max_length=200, description="the ad opened, one the search showed")


class ClickResponse(BaseModel):
    click_id: str
    request_id: str
    ad_id: str
    position: int  # where the search showed the ad, from 1 (taken from the log, not the client)


def create_app(model: Any, cfg: ServeConfig, *, model_uri: str, info: dict | None = None,
               api_key: str | None = None, engine: Any = None, watcher: Any = None,
               image_file=None, search_log: SearchLog | None = None, challenger: Challenger | None = None,
               interleave_seed: int = 0, interleave_off: str = "",
               new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> FastAPI:
    """The app over `model` (anything with `predict(DataFrame) -> DataFrame`, e.g. a pyfunc;
    None: not loaded, /health and /search answer 503). `api_key`: required on every route but
    the page when set (else `cfg.host`/`cfg.port` name the Host values answered).
    `engine`: the model's `SearchEngine` (catalogue version and images on /health, /image);
    `watcher`: its `CatalogueWatcher` (reload errors on /health); `image_file(ref) -> Path|None`
    resolves an ad's image reference. `search_log`: where answered searches and clicks are
    logged (None: logging off); the app closes it when it shuts down.

    `challenger`: a second model; a search whose `interleave_draw(interleave_seed, request id)`
    is below `cfg.interleave_share` asks both and answers with a team-draft interleaving of the
    two rankings (`interleave_answers`), logging per position which model contributed it, when
    both answered from the same catalogue version (else the served model's answer alone).
    `interleave_off`: why there is no challenger although the share is above 0 (/health).
    `new_request_id`: where request ids come from (random by default; the loop benchmark draws
    them from a seed, so its interleavings repeat run after run)."""

    class SearchRequest(BaseModel):
        query: str = Field(..., max_length=cfg.max_query_chars, description="the user's text query")
        k: int = Field(cfg.default_k, ge=1, le=cfg.max_k, description="how many ads to return")
        source: SearchSource = Field("api", description="who asks: `page` (the search page) or `api`")

        @field_validator("query")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("query must not be empty or blank")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # lone surrogates (valid JSON escapes, not text)
                raise ValueError("query is not valid Unicode text") from exc
            return value

    version = (info or {}).get("version")
    model_uri = redact_uri(model_uri)  # shown on /health, in answers and the API docs
    # Concurrent searches share one model call (batching.py); batch_max 1 = one call each.
    batcher = (MicroBatcher(model.predict, cfg.batch_max, cfg.batch_wait_ms)
               if model is not None and cfg.batch_max > 1 else None)
    interleaving = challenger is not None and model is not None and cfg.interleave_share > 0
    challenger_batcher = (MicroBatcher(challenger.predict, cfg.batch_max, cfg.batch_wait_ms)
                          if interleaving and cfg.batch_max > 1 else None)
    labels = (contributor_label((info or {}).get("name") or "model", version or "?"),
              contributor_label(challenger.info.get("name") or "model", challenger.info.get("version") or "?")
              if challenger is not None else "")
    # skipped: the two answered from different catalogue versions; challenger_failed: it raised
    interleave_counts = {"interleaved": 0, "skipped": 0, "challenger_failed": 0}
    counts_lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            for each in (batcher, challenger_batcher):
                if each is not None:
                    each.close()
            if search_log is not None:  # writes what is still queued
                await asyncio.to_thread(search_log.close)

    app = FastAPI(title="alignsearch", description=f"Search ads by text (Align before Search); model {model_uri}.",
                  version=f"model v{version}" if version else "model", lifespan=lifespan)

    def run(request: SearchRequest, request_id: str) -> SearchResponse:
        if model is None:
            raise HTTPException(status_code=503, detail="no model loaded")
        started = time.perf_counter()
        # An exception here (the model failed on a valid request) reaches `_Guard`: logged with
        # its traceback, a generic 500 with the request id for the client.
        log.debug("request %s: query %r, k=%d", request_id, request.query[:100], request.k)
        interleave = interleaving and interleave_draw(interleave_seed, request_id) < cfg.interleave_share
        answers = _ask(request, interleave)
        rows, contributors = answers[0], None
        if interleave:
            rows, contributors = _interleave(request, request_id, *answers)
        catalogue_version = _catalogue_of(rows) or (engine.catalogue_version if engine is not None else None)
        response = SearchResponse(request_id=request_id, query=request.query, k=request.k, model_uri=model_uri,
                                  model_version=version, catalogue_version=catalogue_version,
                                  took_ms=round((time.perf_counter() - started) * 1000, 2), results=_hits(rows),
                                  interleaved=contributors is not None)
        if search_log is not None:
            _log_search(request, response, contributors)
        return response

    def _ask(request: SearchRequest, both: bool) -> list[list[dict] | None]:
        """The served model's answer (its frame's rows), and with `both` the challenger's, asked
        at once (each model's batcher answers in its own thread)."""
        if batcher is not None:
            served = batcher.submit(request.query, request.k)
            second = challenger_batcher.submit(request.query, request.k) if both else None
            return [served.result().to_dict("records"), *([_challenger_answer(second.result)] if both else [])]
        query = pd.DataFrame({"query": [request.query], "k": [request.k]})
        return [model.predict(query).to_dict("records"),
                *([_challenger_answer(lambda: challenger.predict(query))] if both else [])]

    def _challenger_answer(answer) -> list[dict] | None:
        # The challenger failing never fails a search: the served model answers it alone.
        try:
            return answer().to_dict("records")
        except Exception:  # noqa: BLE001
            log.exception("the challenger failed; answering with the served model alone")
            return None

    def _catalogue_of(rows: list[dict]) -> str | None:
        version = rows[0].get("catalogue_version") if rows else None
        return None if version is None or (isinstance(version, float) and version != version) else str(version)

    def _interleave(request: SearchRequest, request_id: str, served: list[dict],
                    second: list[dict] | None) -> tuple[list[dict], list[str] | None]:
        # Both must rank one catalogue version: right after the served model's catalogue was
        # swapped, the challenger's copy of it may still be on its way (then: not interleaved).
        same = second is not None and _catalogue_of(served) is not None \
            and _catalogue_of(served) == _catalogue_of(second)
        with counts_lock:
            interleave_counts["interleaved" if same else "skipped" if second is not None else "challenger_failed"] += 1
        if not same:
            return served, None
        return interleave_answers(served, second, request.k, random.Random(f"{interleave_seed}:{request_id}"), labels)

    def _log_search(request: SearchRequest, response: SearchResponse, contributors: list[str] | None) -> None:
        # Positions are the hits' places in the answer, from 1 (what a person scanning it sees).
        hits = [(hit.ad_id, position, hit.score) for position, hit in enumerate(response.results, start=1)]
        try:
            search_log.log_search(request_id=response.request_id, query=request.query, k=request.k, hits=hits,
                                  model_name=(info or {}).get("name"), model_version=version,
                                  catalogue_version=response.catalogue_version, source=request.source,
                                  took_ms=response.took_ms, contributors=contributors)
        except Exception:  # noqa: BLE001 - the log never fails a search it did not answer
            log.exception("request %s: the search was answered but could not be logged", response.request_id)

    def _request_id(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id", "-")

    @app.get("/health")
    def health() -> dict:
        if model is None:
            raise HTTPException(status_code=503, detail={"status": "no model loaded",
                                                         "model_uri": model_uri})
        out = {"status": "ok", "model_uri": model_uri, "version": version, **(info or {})}
        if engine is not None:
            out.update(engine.catalogue.describe())
        if batcher is not None:
            out["batches"], out["batched_queries"] = batcher.batches, batcher.queries
        if watcher is not None:
            out["catalogue_reloads"] = watcher.reloads
            out["catalogue_reload_error"] = redact_uri(watcher.last_error)
        out["traffic"] = search_log.stats() if search_log is not None else {"logging": "off"}
        out["interleave"] = _interleave_health()
        return out

    def _interleave_health() -> dict:
        if not interleaving:
            return {"status": "off", "share": cfg.interleave_share,
                    **({"reason": interleave_off} if cfg.interleave_share > 0 and interleave_off else {})}
        with counts_lock:
            counts = dict(interleave_counts)
        return {"status": "on", "share": cfg.interleave_share, "seed": interleave_seed, "champion": labels[0],
                "challenger": labels[1], **challenger.describe(), **counts}

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/image")
    def image(ad_id: Annotated[str, Query(max_length=1000)]) -> FileResponse:
        ref = engine.image_ref(ad_id) if engine is not None else None
        path = image_file(ref) if ref and image_file is not None else None
        found = image_format(path) if path is not None else None
        if found is None:
            raise HTTPException(status_code=404, detail="no image for this ad")
        return FileResponse(path, media_type=IMAGE_FORMATS[found].media_type, headers=IMAGE_HEADERS)

    @app.post("/search", response_model=SearchResponse)
    def search_post(body: SearchRequest, request: Request) -> SearchResponse:
        return run(body, _request_id(request))

    @app.get("/search", response_model=SearchResponse)
    def search_get(request: Request,
                   q: Annotated[str, Query(max_length=cfg.max_query_chars, description="the text query")],
                   k: Annotated[int, Query(ge=1, le=cfg.max_k)] = cfg.default_k,
                   source: Annotated[SearchSource, Query(description="`page` from the search page")] = "api",
                   ) -> SearchResponse:
        if not q.strip():
            raise HTTPException(status_code=422, detail="query parameter q must not be empty or blank")
        try:
            body = SearchRequest(query=q, k=k, source=source)
        except ValidationError as exc:
            raise HTTPException(status_code=422, detail=[e["msg"] for e in exc.errors()]) from exc
        return run(body, _request_id(request))

    @app.post("/click", response_model=ClickResponse,
              responses={404: {"description": "no such search logged (reason unknown_request), or logging off "
                               "(reason logging_off)"},
                         409: {"description": "that ad of that search was clicked already (repeated_click)"},
                         410: {"description": "too long after the search (click_too_late)"},
                         422: {"description": "the search did not show that ad (ad_not_shown), or a bad body"}})
    def click(body: ClickRequest, request: Request):
        """Record a click on an ad a logged search showed; the position is the one it was shown
        at. Answered once the click is written; refused clicks write nothing."""
        if search_log is None:
            refused = ClickRefused(404, "logging_off", "this service does not log searches, so it takes no clicks "
                                   "(started with --no-log, serve.log_traffic false, or no traffic store)")
        else:
            try:
                return ClickResponse(**search_log.click(body.request_id, body.ad_id))
            except ClickRefused as exc:
                refused = exc
        log.info("request %s: click on %r of %s refused (%s)", _request_id(request), body.ad_id[:100],
                 body.request_id[:100], refused.reason)
        # `request_id` names the search the click named, as in the request (this request's own
        # id is its X-Request-ID header).
        return JSONResponse(status_code=refused.status, content={"detail": refused.detail, "reason": refused.reason,
                                                                 "request_id": body.request_id})

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Not FastAPI's default: that echoes the input back (10 kB of it, or a lone surrogate
        # that cannot be encoded, which turned a 422 into a 500).
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors, "request_id": _request_id(request)})

    app.add_middleware(_Guard, cfg=cfg, api_key=api_key, new_request_id=new_request_id)
    return app
