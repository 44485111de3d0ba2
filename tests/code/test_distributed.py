"""Distributed training and compute: the matcher under DDP on CPU (2 gloo processes), and the
Trainer arguments taken from params.yaml.

DDP runs in a subprocess with a clean environment: Lightning's ranks must not inherit
pytest's process (docs/install.md#tests), and MASTER_PORT must not leak into later tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from components.config import load_params
from components.match.module import num_processes, trainer_strategy
from flows.runtime import OFFLINE_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]

# Trains text_only with 2 CPU ranks through the real stage (run_train_matcher), logging into an
# MLflow run (sqlite) with the flow's RunLogger, then reloads the saved scorer and scores.
DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path

    # Module level runs in every rank (spawn imports this file as __mp_main__): each rank that
    # starts fitting leaves a mark, so the test sees how many took part.
    from components.match.module import MatcherModule

    def _mark(self):
        Path(sys.argv[1], f"rank{self.global_rank}of{self.trainer.world_size}").touch()

    MatcherModule.on_fit_start = _mark

    def main(root: Path) -> None:
        import mlflow
        import numpy as np
        from components.data.config import DataConfig, SyntheticConfig
        from components.data.build import build_dataset
        from components.data.format import read_dataset
        from components.match.config import MatchConfig
        from components.match.stage import run_train_matcher, split_data
        from components.match.systems import load_scorer
        from components.registry.lightning import RunLogger

        dataset_dir = root / "dataset"
        build_dataset(DataConfig(source="synthetic", out_dir=dataset_dir, seed=0, max_ads=None,
                                 synthetic=SyntheticConfig(num_ads=60, image_size=64)))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("ddp")).info.run_id
        cfg = MatchConfig(lr=1e-4, max_steps=5, eval_every=2, batch_size=8, trainable_layers=1,
                          accelerator="cpu", devices=2, strategy="ddp", num_nodes=1)
        started = time.perf_counter()
        result = run_train_matcher(cfg, dataset_dir=dataset_dir, out_dir=root / "matcher", system="text_only",
                                   logger=RunLogger(run_id=run_id, tracking_uri=uri, prefix="matcher"))
        seconds = time.perf_counter() - started
        scorer = load_scorer(result.scorer_dir, "cpu")
        test = split_data(read_dataset(dataset_dir), "test", features=None, words=None)
        scores = scorer.score(test.queries, test.ads)
        steps = [m.step for m in client.get_metric_history(run_id, "matcher-train/loss")]
        vals = [m.step for m in client.get_metric_history(run_id, "matcher-val/ndcg_at_10")]
        print("RESULT " + json.dumps({
            "pid": os.getpid(), "seconds": seconds, "info": scorer.info, "shape": list(scores.shape),
            "finite": bool(np.isfinite(scores).all()), "loss_steps": steps, "val_steps": vals,
            "files": sorted(str(p.relative_to(root / "matcher")) for p in (root / "matcher").rglob("*")
                            if p.is_file())}))

    if __name__ == "__main__":  # spawned ranks import this file as __mp_main__: nothing runs then
        main(Path(sys.argv[1]))
''')


def _clean_env() -> dict[str, str]:
    drop = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "PL_GLOBAL_SEED",
            "PL_TRAINER_GPUS", "PYTEST_CURRENT_TEST")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OFFLINE_ENV)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the test is about CPU DDP even where a GPU exists
    return env


def test_trainer_arguments_come_from_params_and_default_to_one_process():
    cfg = load_params(REPO_ROOT / "params.yaml").match
    assert (cfg.accelerator, cfg.devices, cfg.strategy, cfg.num_nodes) == ("auto", "auto", "auto", 1)
    over = load_params(REPO_ROOT / "params.yaml",
                       ["match.devices=2", "match.strategy=ddp", "match.accelerator=cpu", "match.num_nodes=2"]).match
    assert (over.accelerator, over.devices, over.strategy, over.num_nodes) == ("cpu", 2, "ddp", 2)
    assert num_processes("cpu", "auto") == 1
    assert num_processes("cpu", 2, num_nodes=2) == 4
    assert num_processes("cpu", "0,1") == 2
    # More than one process: the ranks are spawned, so the caller goes on alone.
    assert trainer_strategy("auto", "cpu", 2, 1) == "ddp_spawn"
    assert trainer_strategy("ddp", "cpu", 2, 1) == "ddp_spawn"
    assert trainer_strategy("auto", "cpu", "auto", 1) == "auto"
    assert trainer_strategy("ddp_fork", "cpu", 2, 1) == "ddp_fork"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_matcher_trains_with_ddp_on_two_cpu_processes_and_the_result_loads_and_scores(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=200)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, f"DDP training failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    # One process went on after fit: the spawned ranks never reach the end of the script.
    assert len(lines) == 1, proc.stdout[-2000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    print(f"DDP (2 CPU ranks, gloo): training {result['seconds']:.1f} s, subprocess {wall:.1f} s")
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0of2", "rank1of2"]
    info = result["info"]
    assert info["steps"] == 5
    assert [step for step, _ in info["val_history"]] == [2, 4, 5]  # the budget's end validated too
    assert info["val_ndcg@10"] == max(v for _, v in info["val_history"])
    assert result["finite"] and result["shape"][0] > 0 and result["shape"][1] > 0
    # Rank 0 alone logged to MLflow: one value per step, no duplicates from rank 1.
    assert result["loss_steps"] == sorted(set(result["loss_steps"])) and result["loss_steps"]
    # Two evaluations on the ranks, each logged once; the final check runs in the caller, unlogged.
    assert len(result["val_steps"]) == 2 == len(set(result["val_steps"]))
    assert "run/checkpoints/best.ckpt" in result["files"] and "scorer/scorer.json" in result["files"]


# --------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


def test_compute_params_choose_the_runner(monkeypatch):
    from prefect_dask import DaskTaskRunner

    from components.config import ComputeConfig
    from flows.compute import DASK_ADDRESS_ENV, dask_task_runner

    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    assert load_params(REPO_ROOT / "params.yaml").compute.workers == 0
    assert dask_task_runner(ComputeConfig()) is None  # sequential by default
    local = dask_task_runner(ComputeConfig(workers=2))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 2
    team = dask_task_runner(ComputeConfig(workers=2, scheduler_address="tcp://127.0.0.1:8786"))
    assert team.address == "tcp://127.0.0.1:8786"
    monkeypatch.setenv(DASK_ADDRESS_ENV, "tcp://127.0.0.1:9999")
    assert dask_task_runner(ComputeConfig(scheduler_address="tcp://127.0.0.1:8786")).address == "tcp://127.0.0.1:9999"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_features_on_dask_equal_the_sequential_features(prefect_harness, synthetic_dataset_dir, tmp_path,
                                                        monkeypatch):
    """Shards as Prefect tasks on a running 2-worker scheduler given by ALIGNSEARCH_DASK_ADDRESS
    (as a team's): the same arrays as one process (fresh caches each), bit for bit but the
    softmax scores, which agree to float rounding."""
    from distributed import LocalCluster
    from prefect import flow

    from components.vision.parts import PartsConfig, PartsFeatures
    from flows.compute import DASK_ADDRESS_ENV
    from flows.retrain import features

    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    vision = PartsConfig(input_size=64, num_parts=4, logits_topk=3).model_dump(mode="json")
    seconds = {}

    @flow
    def retrain_features(name: str, compute: dict) -> dict:  # the retrain flow's own features task
        # Relative stage and cache paths, as params.yaml gives them: the workers' cwd is not ours.
        return features(f"test-{name}", vision, str(synthetic_dataset_dir), name, f"cache-{name}", compute=compute)

    def run(name: str, compute: dict) -> PartsFeatures:
        started = time.perf_counter()
        out = retrain_features(name, compute)
        seconds[name] = time.perf_counter() - started
        assert not list(tmp_path.rglob(".shards")) and not list(tmp_path.glob(".tmp-*"))  # merged, renamed
        return PartsFeatures.load(Path(out["features_path"]))

    monkeypatch.chdir(tmp_path)
    sequential = run("sequential", {"workers": 0})
    monkeypatch.chdir(REPO_ROOT)
    # `compute.workers: 2` builds the same LocalCluster through prefect-dask (the runner is checked
    # above); starting it here too would add ~20 s for the same shard tasks.
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                      dashboard_address=":0") as cluster:
        monkeypatch.setenv(DASK_ADDRESS_ENV, cluster.scheduler_address)
        monkeypatch.chdir(tmp_path)  # after the workers started elsewhere
        team = run("team", {"workers": 0, "feature_shard_size": 64})
        ran_on_cluster = sorted(cluster.scheduler.task_prefixes)
    print("features seconds:", {k: round(v, 1) for k, v in seconds.items()}, "cluster tasks:", ran_on_cluster)
    assert any("features" in prefix for prefix in ran_on_cluster), ran_on_cluster
    assert len(sequential) == 120
    for other in (team,):
        assert other.paths == sequential.paths
        for name in PartsFeatures.ARRAYS:
            if name == "topk_scores":  # the classifier's matmul sums in a thread-count-dependent order
                np.testing.assert_allclose(getattr(other, name), sequential.topk_scores, rtol=1e-5, atol=1e-6)
            else:  # backbone maps, regions, boxes, top-k classes: bit for bit
                np.testing.assert_array_equal(getattr(other, name), getattr(sequential, name), err_msg=name)


@pytest.mark.timeout(600)
def test_benchmark_cells_on_dask_give_the_sequential_rows(prefect_harness, synthetic_dataset_dir, tmp_path):
    """The benchmark's learning-rate searches and runs as Prefect tasks on a running 2-worker
    scheduler (`compute.scheduler_address`, as a team's) write the rows of the in-process run."""
    from distributed import LocalCluster

    from components.evaluate.benchmark import run_benchmark
    from flows.compute import cell_mapper

    params = load_params(overrides=[f"data.cache_dir={tmp_path / 'cache'}", "benchmark.quick_max_steps=6",
                                    "benchmark.gallery_size=0", "match.lr_grid=[0.0001,0.001]"])
    bench = params.benchmark.model_copy(update={"systems": ["text_only", "late_fusion", "ours"], "ablations": [],
                                                "fractions": [1.0], "seeds": [0]})

    def rows(name: str, map_cells=None) -> list[tuple]:
        result = run_benchmark(bench, dataset_dir=synthetic_dataset_dir, out_dir=tmp_path / name,
                               cache_dir=tmp_path / "cache", parts_cfg=params.vision, align_cfg=params.align,
                               match_cfg=params.match, quick=True, map_cells=map_cells)
        return sorted((r["system"], r["fraction"], r["seed"], r["subset"], r["metric"], r["value"]) for r in result.rows)

    sequential = rows("sequential")
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                      dashboard_address=":0") as cluster:
        on_dask = rows("dask", cell_mapper({"scheduler_address": cluster.scheduler_address}))
        ran = sorted(cluster.scheduler.task_prefixes)
    assert any("benchmark-cell" in prefix or "benchmark_cell" in prefix for prefix in ran), ran
    assert {r[0] for r in sequential} >= {"text_only", "late_fusion", "ours"}
    assert on_dask == sequential
