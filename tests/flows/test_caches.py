"""Caches right in both directions: a stage's cache key (flow) and its dvc.yaml deps come from
one list of the code it runs (components/stages.py), and the text-embedding cache knows which
encoder wrote it."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.stages import (
    STAGE_MODULES,
    dvc_code_deps,
    stage_code,
    stage_code_version,
    write_dvc_deps,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dvc_yaml_deps_are_the_stage_code_lists():
    declared = dvc_code_deps(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text()))
    for stage, deps in declared.items():
        assert stage in STAGE_MODULES, f"dvc.yaml stage {stage!r} has no entry in components/stages.py"
        assert deps == stage_code(stage), (
            f"dvc.yaml deps of {stage!r} differ from the code it runs; run `python -m components.stages --write`")
    assert set(declared) == set(STAGE_MODULES) - {"register"}


def test_write_dvc_deps_is_a_fixed_point(tmp_path):
    """Regenerating dvc.yaml from the lists changes nothing (and keeps the data deps)."""
    path = tmp_path / "dvc.yaml"
    shutil.copy(REPO_ROOT / "dvc.yaml", path)
    assert not write_dvc_deps(path)
    stages = yaml.safe_load(path.read_text())["stages"]
    assert "${data.out_dir}" in stages["align"]["deps"] and "${paths.features_dir}" in stages["align"]["deps"]


def test_stage_code_is_what_the_stage_imports():
    align = stage_code("align")
    assert "components/align/stage.py" in align and "components/text/encoder.py" in align
    assert "components/align/__init__.py" in align  # importing a module runs its package's __init__
    assert not any(name.startswith(("components/search/", "components/match/", "components/evaluate/",
                                    "components/registry/")) for name in align)
    assert "components/data/validate.py" in stage_code("validate")
    assert "components/vision/parts.py" in stage_code("features")
    assert "components/align/stage.py" not in stage_code("train_matcher")


@pytest.fixture()
def code_copy(tmp_path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _keys(root: Path) -> dict[str, str]:
    return {stage: stage_code_version(stage, root) for stage in STAGE_MODULES}


def test_a_docstring_in_the_service_does_not_change_the_alignment_key(code_copy):
    before = _keys(code_copy)
    service = code_copy / "components/search/service.py"
    service.write_text(service.read_text().replace('"""', '"""An edited docstring. ', 1))
    after = _keys(code_copy)
    assert {s for s in STAGE_MODULES if before[s] != after[s]} == set()  # no stage runs the HTTP service


def test_an_edit_to_validation_changes_only_the_stages_that_run_it(code_copy):
    before = _keys(code_copy)
    with (code_copy / "components/data/validate.py").open("a") as fh:
        fh.write("\n# an edit\n")
    after = _keys(code_copy)
    changed = {s for s in STAGE_MODULES if before[s] != after[s]}
    assert "validate" in changed and not changed & {"build_data", "features", "align", "train_matcher", "evaluate"}
    assert changed == {s for s in STAGE_MODULES if "components/data/validate.py" in stage_code(s, code_copy)}


def test_an_edit_to_the_matcher_leaves_features_and_alignment_alone(code_copy):
    before = _keys(code_copy)
    with (code_copy / "components/match/module.py").open("a") as fh:
        fh.write("\n# an edit\n")
    after = _keys(code_copy)
    changed = {s for s in STAGE_MODULES if before[s] != after[s]}
    assert {"train_matcher", "evaluate"} <= changed
    # registration loads the trained scorer (match.scorers), never the training module
    assert not changed & {"validate", "features", "align", "build_data", "register"}
    with (code_copy / "components/match/encoder.py").open("a") as fh:  # the tower every stage of it loads
        fh.write("\n# an edit\n")
    again = _keys(code_copy)
    assert {"train_matcher", "evaluate", "register"} <= {s for s in STAGE_MODULES if after[s] != again[s]}


def test_flow_keys_use_each_stage_own_code():
    from flows import retrain

    keys = {stage: retrain.code_key(stage, task) for stage, task in [
        ("validate", retrain.validate), ("features", retrain.features), ("align", retrain.align),
        ("train_matcher", retrain.train_matcher), ("evaluate", retrain.evaluate)]}
    assert len(set(keys.values())) == len(keys)
    # the features task runs through a flow helper: its code (and what it imports) is in the key
    from components.stages import module_code

    assert "flows/compute.py" in module_code(("flows.compute",))
    assert keys["align"] == retrain.code_key("align", retrain.align)  # stable within a process


def test_text_cache_is_keyed_by_the_encoder(tmp_path):
    """Embeddings cached by one encoder are not read back for another with other weights."""
    from components.text.encoder import TextEncoder, load_minilm

    tokenizer, model = load_minilm("cpu")
    texts = ["red bicycle", "a blue cup"]
    first = TextEncoder(model=model, tokenizer=tokenizer, cache_dir=tmp_path)
    cached = first.encode(texts)
    assert np.array_equal(TextEncoder(model=model, tokenizer=tokenizer, cache_dir=tmp_path).encode(texts), cached)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.5)
    second = TextEncoder(model=changed, tokenizer=tokenizer, cache_dir=tmp_path)
    assert second.identity() != first.identity()
    fresh = second.encode(texts)
    assert np.array_equal(fresh, TextEncoder(model=changed, tokenizer=tokenizer).encode(texts))
    assert not np.allclose(fresh, cached)


def test_feature_cache_is_keyed_by_the_backend(synthetic_dataset_dir, tmp_path):
    """Features a torch run cached are not served to an ONNX Runtime run (they differ by ~1e-5,
    enough to move the metrics): each run's numbers depend on its own backend only."""
    from components.vision.cache import extract_parts_cached
    from components.vision.parts import PartsConfig, extract_parts, onnxruntime_available

    if not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    images = sorted((synthetic_dataset_dir / "images").iterdir())[:2]
    cfg = PartsConfig(input_size=96)
    extract_parts_cached(images, cfg, tmp_path, device="cpu", progress=False, backend="torch")
    served = extract_parts_cached(images, cfg, tmp_path, device="cpu", progress=False, backend="onnxruntime")
    direct = extract_parts(images, cfg, "cpu", progress=False, backend="onnxruntime")
    np.testing.assert_array_equal(served.parts, direct.parts)
