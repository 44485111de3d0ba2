"""Settings of the traffic log, the click model and the simulated users (the `traffic` section
of params.yaml; light: no SQLAlchemy, numpy or HTTP import)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.systems import SplitName

# The redactions a query text can go through before it is written (events.REDACTIONS holds
# the functions, keyed by these names).
Redaction = Literal["none", "hash", "drop-digits"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimulatorConfig(_Section):
    """Simulated users (`simulator.run_users`): they search a split's queries over HTTP, examine
    position k with a known propensity and click what the qrels call relevant, with some noise
    (the position-based click model, docs/traffic.md#simulated-users)."""

    seed: int = 0
    split: SplitName = Field("train", description="whose queries the users type (never `test` in a loop "
                             "that is evaluated on test)")
    num_searches: int = Field(200, ge=1, description="searches issued, queries drawn with replacement")
    k: int = Field(10, ge=1, description="results asked for per search")
    eta: float = Field(0.7, ge=0, description="examination propensity of position k is 1/k^eta "
                       "(unless `propensities` is given)")
    propensities: list[float] | None = Field(None, description="examination propensity of positions 1, 2, "
                                             "...; positions past the list are never examined")
    click_relevant: float = Field(0.9, ge=0, le=1, description="P(click | examined, relevant)")
    click_nonrelevant: float = Field(0.05, ge=0, le=1, description="P(click | examined, not relevant): "
                                     "the noise of real clicks")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of each search and click")

    @model_validator(mode="after")
    def _propensities_are_probabilities(self) -> SimulatorConfig:
        if self.propensities is not None and not all(0.0 <= p <= 1.0 for p in self.propensities):
            raise ValueError(f"propensities must lie in [0, 1], got {self.propensities}")
        return self

    def propensity(self, position: int) -> float:
        """P(examined) of a 1-based position."""
        if self.propensities is not None:
            return self.propensities[position - 1] if position <= len(self.propensities) else 0.0
        return float(position) ** -self.eta


class TrafficConfig(_Section):
    """Where searches and clicks are logged, how writes are batched, which clicks count, and the
    click model fitted to them (docs/traffic.md)."""

    store_uri: str = Field("sqlite:///mlruns/traffic.db", description="SQLAlchemy URI of the event log: "
                           "SQLite (WAL) on one machine, postgresql://... shared by a team's replicas")
    batch_size: int = Field(256, ge=1, description="events written in one transaction at most")
    flush_ms: float = Field(200.0, gt=0, description="a batch is written when full or when its oldest "
                            "event is this old: a SIGKILL loses at most these last milliseconds")
    queue_max: int = Field(10_000, ge=1, description="events waiting to be written; beyond it new events "
                           "are dropped and counted, never blocking a search")
    busy_timeout_s: float = Field(5.0, gt=0, description="how long a SQLite write waits for another "
                                  "process's write to finish")
    retention_days: float | None = Field(90.0, gt=0, description="events older than this are deleted "
                                         "(`EventStore.delete_older_than`); null keeps them all")
    click_window_s: float = Field(3600.0, gt=0, description="a click more than this long after its "
                                  "search is refused")
    redact_queries: Redaction = Field("none", description="applied to the query text before it is "
                                      "written: none | hash (sha256 prefix) | drop-digits")
    ipw_clip: float = Field(10.0, ge=1, description="largest inverse-propensity weight a click gets")
    em_max_iter: int = Field(2000, ge=1, description="EM iterations of the click model at most")
    em_tol: float = Field(1e-5, gt=0, description="EM stops when no parameter moves more than this in "
                          "an iteration")
    dataset_dir: str = Field("data/live", description="where `traffic ingest` writes the dataset the loop "
                             "trains on: the base dataset plus every ingested search and click")
    monitoring_experiment: str = Field("alignsearch-monitoring", description="MLflow experiment of "
                                       "`traffic report`'s runs")
    import_max_clicks: int = Field(200, ge=1, description="`traffic import` refuses a file in which one "
                                   "session (or, for rows without session_id, one query) has more clicks: "
                                   "a flood from a bot or a broken export")
    import_clock_skew_s: float = Field(300.0, ge=0, description="`traffic import` refuses events timed more "
                                       "than this far in the future (the ad server's clock may run ahead)")
    simulator: SimulatorConfig = SimulatorConfig()


# The systems a loop can run: the fine-tuned ones and late_fusion (its text_only warm-starts).
LoopSystem = Literal["ours", "text_only", "implicit_fusion", "implicit_fusion_words", "late_fusion"]


class LoopBenchmarkConfig(_Section):
    """`alignsearch benchmark-loop` (docs/benchmark.md#the-loop-benchmark): every system runs its
    own loop of simulated searches, ingest, warm retrain and promotion, from a model trained on a
    small share of the training qrels."""

    systems: list[LoopSystem] = Field(["ours", "text_only", "implicit_fusion", "late_fusion"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    rounds: int = Field(3, ge=1, description="rounds after round 0 (searches, ingest, retrain, promotion)")
    start_fraction: float = Field(0.1, gt=0, le=1, description="share of the training queries whose qrels "
                                  "round 0 trains on; the others' relevance is known only to the simulated users")
    searches: int = Field(1000, ge=1, description="searches per round answered by the champion alone")
    online_searches: int = Field(500, ge=1, description="searches per round answered by a team-draft "
                                 "interleaving of champion and challenger (the online verdict)")
    # 500 did not separate final champions 0.02-0.03 apart (3 of 8 settled on openclipart); 2,000 did
    # (7 of 8) and cost 1.5 more minutes per seed.
    final_searches: int = Field(2000, ge=1, description="interleaved searches per pair of systems' final "
                                "champions (the agreement of interleaving with the test split)")
    agreement_min_delta: float = Field(0.02, gt=0, description="pairs whose test ndcg@10 differ by at least "
                                       "this count in the interleaving agreement")
    eval_split: Literal["valid", "test"] = Field("test", description="the split every reported number is on")
    decide_split: Literal["valid", "test"] = Field("valid", description="the split the promotion rule reads: "
                                                   "not the reported one, or the curves would be selected on it")
    bootstrap_samples: int = Field(1000, ge=100)

    @model_validator(mode="after")
    def _decide_on_another_split(self) -> LoopBenchmarkConfig:
        if self.decide_split == self.eval_split:
            raise ValueError(f"decide_split and eval_split are both {self.eval_split!r}: promotion would select "
                             "the champions on the split the benchmark reports")
        return self
