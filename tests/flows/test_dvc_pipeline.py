"""The DVC pipeline's data stages (build_data -> validate) in a temporary git repo: repro,
no-op, push/pull, a stable dvc.lock. The model stages run end to end in test_pipeline_stages.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.data.format import dataset_hash
from components.stages import stage_code

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_dvc(args: list[str], repo_root: Path) -> str:
    """`dvc ARGS` in `repo_root` with this venv's dvc and `alignsearch` (stage commands call it)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_root, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}"
    return proc.stdout


def ensure_dvc_project(repo_root: Path, remote_name: str, remote_dir: Path) -> None:
    """A DVC project with analytics off and a default directory remote (idempotent)."""
    if not (repo_root / ".dvc").is_dir():
        run_dvc(["init", "-q"], repo_root)
        run_dvc(["config", "core.analytics", "false"], repo_root)
    remotes = run_dvc(["remote", "list"], repo_root)
    if not any(line.split()[0] == remote_name for line in remotes.splitlines() if line.strip()):
        run_dvc(["remote", "add", "-d", remote_name, str(remote_dir)], repo_root)
    Path(remote_dir).mkdir(parents=True, exist_ok=True)


def lock_md5(repo_root: Path, path: str) -> str | None:
    """The md5 `dvc.lock` records for the output or metric at `path`."""
    lock = yaml.safe_load((repo_root / "dvc.lock").read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5")
    return None


@pytest.fixture()
def dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO_ROOT / ".dvcignore", repo / ".dvcignore")
    # the data stages depend on the code they run (components/stages.py): the repo needs those files
    for name in sorted(set(stage_code("build_data")) | set(stage_code("validate"))):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, repo / name)
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
    assert lock_md5(repo, "data/synthetic") == dataset_hash(repo / "data/synthetic")


def test_forced_repro_leaves_dvc_lock_unchanged_and_a_validation_edit_reruns_validation(dvc_repro_result):
    """validation.json holds no timings: validating the same data again records the same hash,
    so dvc.lock does not change on every repro. And the stage depends on its own code
    (components/stages.py): an edit to validate.py reruns validation, not the build."""
    repo, _, _ = dvc_repro_result
    before = (repo / "dvc.lock").read_text()
    run_dvc(["repro", "--force", "--single-item", "validate"], repo)
    assert "seconds" not in (repo / "reports/validation/validation.json").read_text()
    assert (repo / "dvc.lock").read_text() == before

    with (repo / "components/data/validate.py").open("a") as fh:
        fh.write("\n# an edit\n")
    out = run_dvc(["repro", "validate"], repo)
    assert "Running stage 'validate'" in out and "Running stage 'build_data'" not in out


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


@pytest.fixture()
def dvc_repro_result(dvc_repo):
    first = run_dvc(["repro", "validate"], dvc_repo)
    second = run_dvc(["repro", "validate"], dvc_repo)
    return dvc_repo, first, second
