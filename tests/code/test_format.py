"""The interchange format: round trip, schema errors that name the file, content hash."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components.data.format import (
    Dataset,
    DatasetFormatError,
    dataset_hash,
    read_dataset,
    write_dataset,
)


def _toy_dataset() -> Dataset:
    ads = pd.DataFrame({
        "ad_id": ["a1", "a2", "a3"],
        "title": ["red ball", "", "blue box"],
        "image_path": ["images/a1.png", "images/a2.png", "images/a3.png"],
        "split": ["train", "valid", "test"],
        "category": ["toys", "toys", "home"],
    })
    queries = pd.DataFrame({"query_id": ["q1", "q2"], "text": ["ball", "box"], "split": ["train", "test"]})
    qrels = pd.DataFrame({"query_id": ["q1", "q2"], "ad_id": ["a1", "a3"], "relevance": [1, 0],
                          "split": ["train", "test"]})
    return Dataset(ads=ads, queries=queries, qrels=qrels)


def test_round_trip_keeps_values_and_types(tmp_path):
    original = _toy_dataset()
    write_dataset(original, tmp_path)
    loaded = read_dataset(tmp_path)
    for name in ("ads", "queries", "qrels"):
        pd.testing.assert_frame_equal(
            getattr(loaded, name).astype(object), getattr(original, name).astype(object), check_dtype=False
        )
    assert loaded.qrels["relevance"].dtype == "int64"
    assert loaded.ads["title"].tolist()[1] == ""  # empty titles survive
    assert loaded.root == tmp_path


def test_counts_per_split():
    counts = _toy_dataset().counts()
    assert counts["ads"] == {"train": 1, "valid": 1, "test": 1, "total": 3}
    assert counts["positive_qrels"] == {"train": 1, "valid": 0, "test": 0, "total": 1}


def test_split_selects_rows_of_one_split():
    test_part = _toy_dataset().split("test")
    assert test_part.ads["ad_id"].tolist() == ["a3"]
    assert test_part.queries["query_id"].tolist() == ["q2"]
    with pytest.raises(ValueError, match="unknown split"):
        _toy_dataset().split("dev")


def test_missing_column_names_file_and_column(tmp_path):
    write_dataset(_toy_dataset(), tmp_path)
    pd.DataFrame({"query_id": ["q1"], "split": ["train"]}).to_parquet(tmp_path / "queries.parquet")
    with pytest.raises(DatasetFormatError, match=r"queries\.parquet.*'text'"):
        read_dataset(tmp_path)
    assert "text" not in read_dataset(tmp_path, strict=False).queries.columns


def test_missing_file_is_named(tmp_path):
    write_dataset(_toy_dataset(), tmp_path)
    (tmp_path / "qrels.parquet").unlink()
    with pytest.raises(DatasetFormatError, match="qrels.parquet: file not found"):
        read_dataset(tmp_path)


def test_hash_changes_with_content_and_names(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"one")
    first = dataset_hash(tmp_path)
    assert first == dataset_hash(tmp_path) and first.endswith(".dir")
    (tmp_path / "images" / "a.png").write_bytes(b"two")
    second = dataset_hash(tmp_path)
    (tmp_path / "images" / "a.png").rename(tmp_path / "images" / "b.png")
    assert len({first, second, dataset_hash(tmp_path)}) == 3


def test_ad_rows_map_a_split_back_to_dataset_rows():
    dataset = _toy_dataset()
    assert dataset.ad_rows(dataset.split("test")) == [2]
    assert dataset.ad_rows(dataset) == [0, 1, 2]


def test_hash_is_dvcs_where_a_file_and_a_folder_share_a_name(tmp_path):
    # "canada.png" sorts before "canada/..." as DVC sorts relpaths; by path parts it sorts after.
    data = tmp_path / "repo" / "data"
    (data / "flags" / "canada").mkdir(parents=True)
    (data / "flags" / "canada.png").write_bytes(b"maple")
    (data / "flags" / "canada" / "acadia.png").write_bytes(b"acadia")
    (data / "flags" / "canadb.png").write_bytes(b"b")
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path / "repo", check=True)
    subprocess.run([dvc, "add", "-q", "data"], cwd=tmp_path / "repo", check=True)
    recorded = (tmp_path / "repo" / "data.dvc").read_text()
    assert f"md5: {dataset_hash(data)}" in recorded
