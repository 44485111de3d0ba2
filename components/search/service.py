"""The HTTP search service: a small FastAPI app over a loaded alignsearch pyfunc model.

Why FastAPI rather than `mlflow models serve`: we want a request schema with limits that
answer 4xx with a message (empty query, k too large, text too long), a response shaped for
search (ranked hits with their visual words), and a health endpoint naming the model version,
all in the same process as the CLI, with no per-model environment to build.

    GET  /health                    -> {"status": "ok", "model_uri": ..., "num_ads": ...}
    GET  /search?q=red+car&k=5      -> {"query": ..., "k": ..., "results": [...]}
    POST /search {"query": ..., "k": 5}
"""

# No `from __future__ import annotations`: FastAPI must see the request model built inside
# `create_app` (its limits come from the config) as a class, not as a string.
import time
from typing import Annotated, Any

import pandas as pd
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field, field_validator

from components.search.config import ServeConfig


class Hit(BaseModel):
    rank: int
    ad_id: str
    title: str
    score: float
    visual_words: list[str]
    matched_words: list[str]


class SearchResponse(BaseModel):
    query: str
    k: int
    model_uri: str
    took_ms: float
    results: list[Hit]


def _hits(frame: pd.DataFrame) -> list[Hit]:
    return [Hit(rank=int(r["rank"]), ad_id=str(r["ad_id"]), title=str(r["title"]), score=float(r["score"]),
                visual_words=[str(w) for w in r["visual_words"]], matched_words=[str(w) for w in r["matched_words"]])
            for r in frame.to_dict("records")]


def create_app(model: Any, cfg: ServeConfig, *, model_uri: str, info: dict | None = None) -> FastAPI:
    """The app over `model` (anything with `predict(DataFrame) -> DataFrame`, e.g. a pyfunc)."""

    class SearchRequest(BaseModel):
        query: str = Field(..., max_length=cfg.max_query_chars, description="the user's text query")
        k: int = Field(cfg.default_k, ge=1, le=cfg.max_k, description="how many ads to return")

        @field_validator("query")
        @classmethod
        def _not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("query must not be empty or blank")
            return value

    version = (info or {}).get("version")
    app = FastAPI(title="alignsearch", description=f"Search ads by text (Align before Search); model {model_uri}.",
                  version=f"model v{version}" if version else "model")

    def run(request: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        try:
            frame = model.predict(pd.DataFrame({"query": [request.query], "k": [request.k]}))
        except Exception as exc:  # the model failed on a valid request: a server error, said plainly
            raise HTTPException(status_code=500, detail=f"search failed: {type(exc).__name__}: {exc}") from exc
        return SearchResponse(query=request.query, k=request.k, model_uri=model_uri,
                              took_ms=round((time.perf_counter() - started) * 1000, 2), results=_hits(frame))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_uri": model_uri, **(info or {})}

    @app.post("/search", response_model=SearchResponse)
    def search_post(request: SearchRequest) -> SearchResponse:
        return run(request)

    @app.get("/search", response_model=SearchResponse)
    def search_get(q: Annotated[str, Query(max_length=cfg.max_query_chars, description="the text query")],
                   k: Annotated[int, Query(ge=1, le=cfg.max_k)] = cfg.default_k) -> SearchResponse:
        if not q.strip():
            raise HTTPException(status_code=422, detail="query parameter q must not be empty or blank")
        return run(SearchRequest(query=q, k=k))

    return app
