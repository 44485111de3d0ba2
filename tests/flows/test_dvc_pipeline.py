"""The DVC pipeline's data stages (build_data -> validate) in a temporary git repo: repro,
no-op, push/pull. The model stages run end to end in test_pipeline_stages.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.data.format import dataset_hash
from components.data.versioning import dvc_output_hash, ensure_dvc_project, run_dvc

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture()
def dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    # build_data depends on the builder's code: the stage needs those files in its repo
    shutil.copytree(REPO_ROOT / "components" / "data", repo / "components" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(source="synthetic", out_dir="data/synthetic", max_ads=None)
    params["data"]["synthetic"].update(num_ads=40, image_size=64)
    params["data"]["cache_dir"] = str(tmp_path / "cache")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    ensure_dvc_project(repo, "local", tmp_path / "remote")
    return repo


def test_repro_builds_validates_and_second_repro_is_a_no_op(dvc_repro_result):
    repo, first, second = dvc_repro_result
    assert "Running stage 'build_data'" in first and "Running stage 'validate'" in first
    assert (repo / "data/synthetic/ads.parquet").is_file()
    assert (repo / "reports/validation/validation.json").is_file()
    assert "Running stage" not in second
    assert "up to date" in second.lower()


def test_lock_hash_equals_dataset_hash(dvc_repro_result):
    repo, _, _ = dvc_repro_result
    assert dvc_output_hash(repo, "data/synthetic") == dataset_hash(repo / "data/synthetic")


def test_param_change_reruns_build(dvc_repro_result):
    repo, _, _ = dvc_repro_result
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "Running stage 'build_data'" in run_dvc(["repro", "validate"], repo)


def test_push_then_pull_restores_the_dataset(dvc_repro_result):
    repo, _, _ = dvc_repro_result
    before = dataset_hash(repo / "data/synthetic")
    run_dvc(["push", "--with-deps", "validate"], repo)
    shutil.rmtree(repo / "data/synthetic")
    shutil.rmtree(repo / ".dvc/cache")
    run_dvc(["pull", "--with-deps", "validate"], repo)
    assert dataset_hash(repo / "data/synthetic") == before


def test_ensure_dvc_project_is_idempotent(dvc_repo):
    config_before = (dvc_repo / ".dvc/config").read_text()
    ensure_dvc_project(dvc_repo, "local", dvc_repo.parent / "remote")
    assert (dvc_repo / ".dvc/config").read_text() == config_before
    assert "analytics = false" in config_before


@pytest.fixture()
def dvc_repro_result(dvc_repo):
    first = run_dvc(["repro", "validate"], dvc_repo)
    second = run_dvc(["repro", "validate"], dvc_repo)
    return dvc_repo, first, second
