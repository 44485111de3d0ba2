"""Searching the registered model: the pyfunc in a fresh process, the HTTP service (request
validation in-process, and the real `alignsearch serve` over a socket), the CLI table."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from ops_helpers import fresh_env, ops_params, start_serve
from typer.testing import CliRunner

from components.catalogue.serving import EngineModel
from components.registry.models import open_model
from components.registry.tracking import configure_mlflow
from components.search.config import ServeConfig
from components.search.engine import SearchEngine
from components.search.service import create_app
from flows.cli import app

pytestmark = pytest.mark.slow

URI = "models:/alignsearch@challenger"
QUERIES = ["tree box", "star"]

FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = model.predict(pd.DataFrame({"query": json.loads(sys.argv[2])}))
print(frame.to_json(orient="records"))
"""


def _cli_sets(root) -> list[str]:
    return ["--set", f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}"]


def test_pyfunc_in_a_fresh_process_ranks_as_in_process(trained_store, tmp_path):
    root, cfg, _ = trained_store
    configure_mlflow(cfg.registry)
    engine = SearchEngine(open_model(URI, tmp_path / "cache").bundle_dir)
    expected = engine.search_frame(pd.DataFrame({"query": QUERIES}))

    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, URI, json.dumps(QUERIES)], cwd=tmp_path,
                         env={**fresh_env(root), "XDG_CACHE_HOME": str(tmp_path / "user-cache")},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answered = pd.DataFrame(json.loads(out.stdout.strip().splitlines()[-1]))

    assert len(answered) == 2 * 10  # default k = 10 per query
    assert answered["ad_id"].tolist() == expected["ad_id"].tolist()
    assert answered["score"].to_numpy() == pytest.approx(expected["score"].to_numpy(), abs=1e-5)
    assert answered["visual_words"].map(list).tolist() == expected["visual_words"].map(list).tolist()
    assert set(answered["query"]) == set(QUERIES)
    assert (answered.groupby("query")["rank"].apply(list) == [list(range(1, 11))] * 2).all()


def test_served_scores_are_the_scores_the_model_was_evaluated_with(trained_template, synthetic_dataset_dir,
                                                                   tmp_path):
    """The index ranks by the model's own q . a: every hit's score equals the evaluation's
    score of that (query, ad), word channel included (its ad vectors are not unit-norm)."""
    from components.data.format import read_dataset

    root, _ = trained_template
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)
    engine = SearchEngine(open_model(URI, tmp_path / "cache").bundle_dir)
    assert engine.scorer.net.word_channel is not None  # the case where normalising changed rankings
    dataset = read_dataset(synthetic_dataset_dir)
    evaluated = engine.score_split(dataset, "test", tmp_path / "cache")
    texts = dataset.split("test").queries.set_index("query_id").loc[evaluated.query_ids, "text"].tolist()[:8]
    column = {a: j for j, a in enumerate(evaluated.ad_ids)}

    compared = 0
    for i, hits in enumerate(engine.search(texts, k=len(engine))):
        for hit in hits:
            if hit.ad_id in column:
                assert hit.score == pytest.approx(evaluated.scores[i, column[hit.ad_id]], rel=1e-4, abs=1e-5)
                compared += 1
    assert compared == len(texts) * len(column)  # every test ad of every query


@pytest.fixture(scope="module")
def client(trained_template, synthetic_dataset_dir, tmp_path_factory):
    """The service over the template store's model: read only (nothing registered or moved)."""
    root, _ = trained_template
    configure_mlflow(ops_params(root, synthetic_dataset_dir).registry)
    model = EngineModel(SearchEngine(open_model(URI, tmp_path_factory.mktemp("cache")).bundle_dir))
    return TestClient(create_app(model, ServeConfig(max_k=20, max_query_chars=50), model_uri=URI,
                                 info={"version": "1"}), base_url="http://127.0.0.1:8080")


def test_service_answers(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["version"] == "1"
    posted = client.post("/search", json={"query": "tree box", "k": 3})
    assert posted.status_code == 200, posted.text
    body = posted.json()
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3]
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(set(hit["matched_words"]) <= set(hit["visual_words"]) for hit in body["results"])
    got = client.get("/search", params={"q": "tree box", "k": 3}).json()
    assert [h["ad_id"] for h in got["results"]] == [h["ad_id"] for h in body["results"]]


@pytest.mark.parametrize(("request_body", "message"), [
    ({"query": "", "k": 3}, "must not be empty"),
    ({"query": "   ", "k": 3}, "must not be empty"),
    ({"query": "tree", "k": 21}, "less than or equal to 20"),
    ({"query": "tree", "k": 0}, "greater than or equal to 1"),
    ({"query": "x" * 51, "k": 3}, "at most 50 characters"),
    ({"k": 3}, "Field required"),
])
def test_service_rejects_bad_requests(client, request_body, message):
    response = client.post("/search", json=request_body)
    assert response.status_code == 422
    assert message in response.text


def test_service_rejects_bad_query_parameters(client):
    assert client.get("/search", params={"q": " "}).status_code == 422
    assert client.get("/search", params={"q": "tree", "k": 1000}).status_code == 422


def test_serve_command_over_http(trained_store, tmp_path):
    """The real `alignsearch serve`: answers, refuses, and logs what it answered in the traffic
    log (on by default), the last searches written when it is stopped."""
    from components.traffic.events import EventStore

    root, _, _ = trained_store
    store_uri = f"sqlite:///{tmp_path / 'traffic.db'}"
    server, url = start_serve(root, URI, [f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                                          f"traffic.store_uri={store_uri}",
                                          "traffic.flush_ms=60000"],  # written only when stopped
                              cwd=tmp_path, log_path=tmp_path / "serve.log", timeout_s=180)
    try:
        answer = httpx.get(f"{url}/search", params={"q": "star", "k": 2}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 2
        assert httpx.post(f"{url}/search", json={"query": ""}, timeout=30).status_code == 422
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["traffic"]["queued"] == 1 and health["traffic"]["written"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    [logged] = EventStore(store_uri).read().impressions.to_dict("records")
    assert logged["event_id"] == answer.json()["request_id"] == answer.headers["x-request-id"]
    assert [h["ad_id"] for h in logged["hits"]] == [r["ad_id"] for r in answer.json()["results"]]
    assert (logged["model_version"], logged["source"]) == ("1", "api")


def test_bench_serve_against_a_real_server(trained_store, tmp_path):
    """`alignsearch bench-serve`, tiny: 50 requests at concurrency 8 to each of two real
    `alignsearch serve`s, the traffic log off and on (0 errors, every search of the logging one
    logged in its scratch store, none in the developer's), and the full bad-input sweep (each
    4xx, none 5xx; each click rule its own status)."""
    from components.search.load import BAD_INPUTS, CLICK_CASES, ODD_INPUTS, SLOW_BODY
    from components.traffic.events import EventStore

    root, _, _ = trained_store
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "bench-serve", "--requests", "50", "--concurrency", "8",
                             "--model-uri", URI, "--out", str(out), *_cli_sets(root)], env=fresh_env(root),
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((out / "bench_serve.json").read_text())
    assert set(report["load"]) == {"off", "on"}
    for load in report["load"].values():
        assert load["requests"] == 50 and load["errors"] == 0 and load["statuses"] == {"200": 50}
        assert 0 < load["latency_ms"]["p50"] <= load["latency_ms"]["p99"] and load["throughput_rps"] > 0
        assert load["cpu_ms_per_request"] > 0  # the server's own CPU, read from /proc
    assert report["model"]["version"] == "1"
    # The logging server's writer saw the warm-up and the load (50 + 50), lost nothing.
    traffic = report["traffic"]
    assert traffic["logging"] == "on" and traffic["written"] + traffic["queued"] == 100
    assert traffic["dropped"] == traffic["failed"] == 0
    stored = EventStore(f"sqlite:///{out / 'bench_traffic.db'}").counts()
    assert stored.impressions >= 100 and stored.clicks == 1  # + the sweep's searches and its one good click
    assert not (tmp_path / "mlruns" / "traffic.db").exists()  # the default store is left alone
    sweep = {c["name"]: c["status"] for c in report["bad_inputs"]}
    assert set(sweep) == {c[0] for c in BAD_INPUTS + ODD_INPUTS} | {SLOW_BODY} | {name for name, _ in CLICK_CASES}
    assert all(400 <= sweep[name] < 500 for name, _, _ in BAD_INPUTS), sweep
    assert sweep[SLOW_BODY] == 408 and sweep["wrong Host header (DNS rebinding)"] == 421, sweep
    assert all(sweep[name] == 200 for name, _, _ in ODD_INPUTS), sweep
    assert [sweep[name] for name, _ in CLICK_CASES] == [200, 409, 422, 404], sweep
    text = (out / "bench_serve.md").read_text()
    assert "p99" in text and "| off |" in text and "| on |" in text


def test_search_command_prints_a_table(trained_store):
    root, _, _ = trained_store
    runner = CliRunner()
    result = runner.invoke(app, ["search", "tree box", "-k", "3", "--model-uri", URI, *_cli_sets(root)])
    assert result.exit_code == 0, result.output
    assert "visual words" in result.output and "syn:" in result.output
    assert runner.invoke(app, ["search", " ", *_cli_sets(root)]).exit_code == 2
    missing = runner.invoke(app, ["search", "tree", "--model-uri", "models:/alignsearch@nobody", *_cli_sets(root)])
    assert missing.exit_code == 1 and "alignsearch promote" in missing.output


def test_schedule_needs_a_server(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(app, ["schedule", "--cron", "0 3 * * 1"])
    assert result.exit_code == 2 and "prefect server start" in result.output


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    """Params name the store; a user's MLFLOW_TRACKING_URI wins; MLflow's own write of that
    variable (set_tracking_uri does it) must not make the previous store stick."""
    from components.registry.config import RegistryConfig
    from components.registry.tracking import tracking_uri

    first = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    second = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_mlflow(first)
    assert tracking_uri(second) == second.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}")
    assert tracking_uri(second).endswith("team/mlflow.db")
    # the user's setting survives our own configuration (MLflow rewrites the variable)
    configure_mlflow(first)
    assert tracking_uri(second).endswith("team/mlflow.db")
    # a value we wrote earlier coming back (e.g. an environment restored) is not the user's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first.tracking_uri)
    assert tracking_uri(second) == second.tracking_uri
