"""Settings of the HTTP search service (light: no web framework import)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# The environment variable the service's API key is read from (by `alignsearch serve` and the
# clients that ask it; the service itself is given the key).
API_KEY_ENV = "ALIGNSEARCH_API_KEY"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Loopback only by default: the service has no authentication (beyond an optional API key).
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    model_uri: str = "models:/alignsearch@champion"
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_query_chars: int = Field(256, ge=1)
    max_body_bytes: int = Field(4096, ge=64, description="larger request bodies get 413")
    max_in_flight: int = Field(16, ge=1, description="requests in flight at once, body reading included, "
                               "per kind (searches, images, the rest); more get 429 at once")
    body_timeout_s: float = Field(5.0, gt=0, description="a request body not received in full within this "
                                  "long gets 408")
    batch_max: int = Field(16, ge=1, description="concurrent searches answered by one model call "
                           "(micro-batching; 1 = a call per request)")
    batch_wait_ms: float = Field(2.0, ge=0, description="how long the first waiting search waits for "
                                 "others to join its batch")
    catalogue_poll_s: float = Field(5.0, ge=0, description="how often the service checks for a new catalogue "
                                    "version of its model (0: never)")
    interleave_share: float = Field(0.0, ge=0, le=1, description="share of searches answered by a team-draft "
                                    "interleaving of the served model and `challenger_uri` (0: off)")
    challenger_uri: str = Field("models:/alignsearch@challenger", description="the model interleaved with "
                                "the served one when interleave_share > 0")
    log_traffic: bool = Field(True, description="log every answered search and take clicks (POST /click) in "
                              "the traffic log, `traffic.store_uri`; false: no log opened, /click answers 404")
