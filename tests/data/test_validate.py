"""Great Expectations validation: a valid tiny dataset passes; each broken copy is caught by name.

Each test breaks one thing in a fresh copy of the tiny dataset (tests/data/conftest.py) and
checks that the failure names the rule, the file and the offending row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.data.config import ValidateConfig
from components.data.format import ADS_FILE, QRELS_FILE, QUERIES_FILE, DatasetFormatError
from components.data.validate import (
    RuleFailure,
    ValidationError,
    ValidationResult,
    format_report,
    validate_dataset,
)

CFG = ValidateConfig(min_image_side=32, max_examples=5)
DECODE_RULE = "image must decode as PNG, JPEG or WebP (Pillow verify + load)"
SYMLINK_RULE = "image_path must not be a symlink (nor lead out of the directory through one)"


def _edit(root: Path, file_name: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Rewrite one table with plain pandas, so broken types reach the parquet file as they are."""
    table = pd.read_parquet(root / file_name)
    change(table).to_parquet(root / file_name, index=False)


def _append(row: dict) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda table: pd.concat([table, pd.DataFrame([row])], ignore_index=True)


def _set(key: str, key_value: str, column: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(table: pd.DataFrame) -> pd.DataFrame:
        table = table.astype({column: object})
        table.loc[table[key] == key_value, column] = value
        return table

    return change


def _only_failure(result: ValidationResult, rule: str) -> RuleFailure:
    """The result failed on exactly this rule and nothing else."""
    assert not result.success
    assert [f.rule for f in result.failures] == [rule], format_report(result)
    return result.failures[0]


def _failure(result: ValidationResult, rule: str) -> RuleFailure:
    assert not result.success
    matches = [f for f in result.failures if f.rule == rule]
    assert len(matches) == 1, format_report(result)
    return matches[0]


@pytest.fixture
def dataset(tiny_dataset_dir) -> Path:
    return tiny_dataset_dir()


def test_valid_dataset_passes_and_writes_reports(dataset, tmp_path):
    report_dir = tmp_path / "reports"
    result = validate_dataset(dataset, CFG, report_dir=report_dir)

    assert result.success, format_report(result)
    assert result.failures == []
    assert result.num_rules >= 30
    assert result.stats["ads"]["rows"] == 6 and result.stats["images"]["files"] == 6
    assert result.stats["splits"]["valid"]["num_queries_with_positive_qrel"] == 1
    assert result.raise_if_failed() is result
    assert "valid" in format_report(result)

    saved = json.loads((report_dir / "validation.json").read_text())
    assert saved["success"] is True and saved["failures"] == []
    assert "passed" in (report_dir / "validation.md").read_text()
    index = report_dir / "data_docs" / "index.html"
    assert index.is_file() and "qrels" in index.read_text()
    assert result.report_paths["data_docs"] == index


def test_no_reports_without_report_dir(dataset):
    result = validate_dataset(dataset, CFG)
    assert result.success and result.report_paths == {}


def test_duplicate_ad_id(dataset):
    ads = pd.read_parquet(dataset / ADS_FILE)
    _edit(dataset, ADS_FILE, _append(ads.iloc[0].to_dict()))  # a second "a1"
    failure = _only_failure(validate_dataset(dataset, CFG), "ad_id must be unique")
    assert failure.table == ADS_FILE and failure.column == "ad_id"
    assert failure.count == 2 and failure.examples == ["a1", "a1"]


def test_duplicate_query_id(dataset):
    _edit(dataset, QUERIES_FILE, _append({"query_id": "q4", "text": "sunny", "split": "test"}))
    failure = _only_failure(validate_dataset(dataset, CFG), "query_id must be unique")
    assert failure.table == QUERIES_FILE and failure.examples == ["q4", "q4"]


def test_qrel_with_unknown_ad(dataset):
    _edit(dataset, QRELS_FILE, _append({"query_id": "q1", "ad_id": "a99", "relevance": 1, "split": "train"}))
    failure = _only_failure(validate_dataset(dataset, CFG), "ad_id must refer to an ad in ads.parquet")
    assert failure.table == QRELS_FILE and failure.count == 1 and failure.examples == ["q1 -> a99"]


def test_qrel_with_unknown_query(dataset):
    _edit(dataset, QRELS_FILE, _append({"query_id": "q99", "ad_id": "a1", "relevance": 1, "split": "train"}))
    failure = _only_failure(validate_dataset(dataset, CFG), "query_id must refer to a query in queries.parquet")
    assert failure.examples == ["q99 -> a1"]


def test_qrel_split_differs_from_ad_split(dataset):
    # q4 is a test query; a3 is a valid ad: a test query's qrels may only name test ads.
    _edit(dataset, QRELS_FILE, _append({"query_id": "q4", "ad_id": "a3", "relevance": 1, "split": "test"}))
    failure = _only_failure(validate_dataset(dataset, CFG), "qrel split must equal its ad's split")
    assert failure.examples == ["q4 -> a3"]
    assert failure.details == ["split='test', ad_split='valid'"]


def test_qrel_split_differs_from_query_split(dataset):
    _edit(dataset, QRELS_FILE, _set("query_id", "q3", "split", "test"))  # q3 and a3 are valid
    result = validate_dataset(dataset, CFG)
    assert sorted(f.rule for f in result.failures) == [
        "qrel split must equal its ad's split", "qrel split must equal its query's split"]
    assert _failure(result, "qrel split must equal its query's split").examples == ["q3 -> a3"]


def test_missing_image(dataset):
    (dataset / "images" / "a3.png").unlink()
    failure = _only_failure(validate_dataset(dataset, CFG), "image_path must exist under the dataset directory")
    assert failure.table == "images/" and failure.examples == ["images/a3.png"]


def test_image_path_outside_dataset_dir_is_missing(dataset):
    (dataset.parent / "outside.png").write_bytes((dataset / "images" / "a1.png").read_bytes())
    _edit(dataset, ADS_FILE, _set("ad_id", "a1", "image_path", "../outside.png"))
    failure = _only_failure(validate_dataset(dataset, CFG), "image_path must exist under the dataset directory")
    assert failure.examples == ["../outside.png"]


def test_corrupt_image(dataset):
    (dataset / "images" / "a4.png").write_bytes(b"this is not a png at all")
    failure = _only_failure(validate_dataset(dataset, CFG), DECODE_RULE)
    assert failure.examples == ["images/a4.png"]


def test_truncated_image(dataset):
    path = dataset / "images" / "a5.png"
    path.write_bytes(path.read_bytes()[:60])  # a valid header, no pixel data
    failure = _only_failure(validate_dataset(dataset, CFG), DECODE_RULE)
    assert failure.examples == ["images/a5.png"]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_image_of_another_format_than_png_jpeg_webp(dataset, fmt):
    """Pillow reads many formats (EPS through Ghostscript among them): only PNG, JPEG and WebP
    are ad images; the file's name says nothing (a PNG named .html passes, a GIF named .png not)."""
    Image.new("RGB", (40, 40), "red").save(dataset / "images" / "a2.png", format=fmt)
    Image.new("RGB", (40, 40), "red").save(dataset / "images" / "a3.html", format="PNG")
    _edit(dataset, ADS_FILE, _set("ad_id", "a3", "image_path", "images/a3.html"))
    failure = _only_failure(validate_dataset(dataset, CFG), DECODE_RULE)
    assert failure.examples == ["images/a2.png"]


def test_too_small_image(dataset):
    Image.new("RGB", (16, 16), "red").save(dataset / "images" / "a2.png")
    failure = _only_failure(validate_dataset(dataset, CFG), "image sides must be >= 32 px")
    assert failure.examples == ["images/a2.png"]
    assert failure.details == ["image_width=16, image_height=16"]


def test_image_with_too_many_pixels_is_refused_before_it_is_decoded(dataset):
    """A small file can hold a huge image (a one-colour PNG compresses ~1000:1): its size is read
    from the header and compared with validate.max_image_pixels before any pixel is decoded,
    so validating many on many threads cannot run out of memory."""
    import time

    Image.new("1", (8000, 8000)).save(dataset / "images" / "a4.png")  # 64 MP in ~10 kB
    assert (dataset / "images" / "a4.png").stat().st_size < 100_000
    started = time.perf_counter()
    failure = _only_failure(validate_dataset(dataset, CFG), "image must have at most 40,000,000 pixels "
                                                           "(validate.max_image_pixels)")
    assert failure.examples == ["images/a4.png"] and failure.details == ["image_width=8000, image_height=8000"]
    assert time.perf_counter() - started < 30
    small = _only_failure(validate_dataset(dataset, ValidateConfig(max_image_pixels=1000)),
                          "image must have at most 1,000 pixels (validate.max_image_pixels)")
    assert small.count == 6 and small.details[0] == "image_width=40, image_height=40"


def test_image_beyond_pillows_own_ceiling_is_named_by_the_same_rule(dataset, monkeypatch):
    """Pillow refuses to open an image of more than 2 x Image.MAX_IMAGE_PIXELS (a decompression
    bomb): that is the pixel rule too, not a decoding failure."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40 x 40 = 1600 > 2 x 500
    failure = _only_failure(validate_dataset(dataset, CFG), "image must have at most 40,000,000 pixels "
                                                           "(validate.max_image_pixels)")
    assert failure.count == 6


@pytest.mark.parametrize(
    ("file_name", "key", "key_value", "example"),
    [(ADS_FILE, "ad_id", "a6", "a6"), (QUERIES_FILE, "query_id", "q2", "q2")],
)
def test_wrong_split_value(dataset, file_name, key, key_value, example):
    _edit(dataset, file_name, _set(key, key_value, "split", "training"))
    failure = _failure(validate_dataset(dataset, CFG), "split must be one of train, valid, test")
    assert failure.table == file_name and failure.examples == [example]
    assert failure.details == ["split='training'"]


def test_wrong_split_value_in_qrels(dataset):
    _edit(dataset, QRELS_FILE, _set("query_id", "q4", "split", "dev"))
    result = validate_dataset(dataset, CFG)
    failure = _failure(result, "split must be one of train, valid, test")
    assert failure.table == QRELS_FILE and failure.examples == ["q4 -> a5"]


def test_negative_relevance(dataset):
    _edit(dataset, QRELS_FILE, lambda t: t.assign(relevance=t["relevance"].where(t["ad_id"] != "a2", -1)))
    failure = _only_failure(validate_dataset(dataset, CFG), "relevance must be >= 0")
    assert failure.count == 2 and failure.examples == ["q1 -> a2", "q2 -> a2"]
    assert failure.details == ["relevance=-1", "relevance=-1"]


def test_fractional_relevance(dataset):
    _edit(dataset, QRELS_FILE, lambda t: t.assign(relevance=[1.0, 0.5, 1.0, 1.0, 1.0]))
    failure = _only_failure(validate_dataset(dataset, CFG), "relevance must be an integer")
    assert failure.count == 1 and failure.examples == ["q1 -> a2"] and failure.details == ["relevance=0.5"]


def test_string_relevance(dataset):
    _edit(dataset, QRELS_FILE, lambda t: t.assign(relevance=t["relevance"].astype(str)))
    failure = _failure(validate_dataset(dataset, CFG), "relevance must be an integer")
    assert failure.count == 5 and failure.details[0] == "relevance='1'"


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_query_text(dataset, text):
    _edit(dataset, QUERIES_FILE, _set("query_id", "q2", "text", text))
    failure = _only_failure(validate_dataset(dataset, CFG), "text must be non-empty after strip")
    assert failure.table == QUERIES_FILE and failure.examples == ["q2"]


def test_null_title(dataset):
    _edit(dataset, ADS_FILE, _set("ad_id", "a1", "title", None))
    failure = _only_failure(validate_dataset(dataset, CFG), "title must not be null")
    assert failure.table == ADS_FILE and failure.examples == ["a1"]


def test_non_string_query_text(dataset):
    _edit(dataset, QUERIES_FILE, lambda t: t.assign(text=[1, 2, 3, 4]))
    failure = _only_failure(validate_dataset(dataset, CFG), "text must be a string")
    assert failure.count == 4 and failure.examples[:2] == ["q1", "q2"]


@pytest.mark.parametrize(
    ("file_name", "column"),
    [(ADS_FILE, "title"), (ADS_FILE, "ad_id"), (QUERIES_FILE, "text"), (QRELS_FILE, "relevance"), (QRELS_FILE, "split")],
)
def test_missing_required_column(dataset, file_name, column):
    _edit(dataset, file_name, lambda t: t.drop(columns=[column]))
    result = validate_dataset(dataset, CFG)
    failure = _only_failure(result, f"required column '{column}' must be present")
    assert failure.table == file_name and failure.column == column
    assert f"{file_name}: required column '{column}' must be present" in format_report(result)


def test_split_without_queries_with_positive_qrels(dataset):
    _edit(dataset, QRELS_FILE, lambda t: t[t["query_id"] != "q3"])  # the only valid-split qrel
    failure = _only_failure(validate_dataset(dataset, CFG), "every split must have a query with a positive qrel")
    assert failure.table == "dataset" and failure.examples == ["valid"]
    assert failure.details == ["num_queries=1, num_queries_with_positive_qrel=0"]


def test_split_with_only_negative_qrels(dataset):
    _edit(dataset, QRELS_FILE, _set("query_id", "q4", "relevance", 0))
    failure = _only_failure(validate_dataset(dataset, CFG), "every split must have a query with a positive qrel")
    assert failure.examples == ["test"]


def test_duplicate_query_ad_pair(dataset):
    _edit(dataset, QRELS_FILE, _append({"query_id": "q1", "ad_id": "a1", "relevance": 0, "split": "train"}))
    failure = _only_failure(validate_dataset(dataset, CFG), "(query_id, ad_id) pairs must be unique")
    assert failure.count == 2 and failure.examples == ["q1 -> a1", "q1 -> a1"]


def test_missing_table_file_names_the_file(dataset):
    (dataset / QRELS_FILE).unlink()
    with pytest.raises(DatasetFormatError, match="qrels.parquet"):
        validate_dataset(dataset, CFG)


def test_examples_are_capped_but_counts_are_not(dataset):
    ads = pd.read_parquet(dataset / ADS_FILE)
    _edit(dataset, ADS_FILE, lambda t: pd.concat([t] + [ads.iloc[[0]]] * 9, ignore_index=True))
    failure = _only_failure(validate_dataset(dataset, ValidateConfig(max_examples=3)), "ad_id must be unique")
    assert failure.count == 10 and failure.examples == ["a1"] * 3


def test_failed_run_writes_reports_and_raises(dataset, tmp_path):
    _edit(dataset, ADS_FILE, _set("ad_id", "a6", "split", "training"))
    (dataset / "images" / "a3.png").unlink()
    report_dir = tmp_path / "reports"
    result = validate_dataset(dataset, CFG, report_dir=report_dir)

    report = format_report(result)
    assert "INVALID" in report
    assert "ads.parquet: split must be one of train, valid, test — 1 row, e.g. 'a6' (split='training')" in report
    assert "images/: image_path must exist under the dataset directory — 1 row, e.g. 'images/a3.png'" in report
    saved = json.loads((report_dir / "validation.json").read_text())
    assert saved["success"] is False
    assert {f["rule"] for f in saved["failures"]} == set(result.failed_rules())
    assert "'images/a3.png'" in (report_dir / "validation.md").read_text()
    assert (report_dir / "data_docs" / "index.html").is_file()
    with pytest.raises(ValidationError, match="split must be one of") as caught:
        result.raise_if_failed()
    assert caught.value.result is result


def test_synthetic_source_writes_a_valid_dataset(synthetic_dataset_dir, tmp_path):
    result = validate_dataset(synthetic_dataset_dir, CFG, report_dir=tmp_path / "reports")
    assert result.success, format_report(result)
    assert result.stats["images"]["files"] == result.stats["ads"]["rows"] > 0


@pytest.mark.parametrize("link", ["outside", "inside", "folder"])
def test_image_path_through_a_symlink_is_refused(dataset, link):
    """A symlink is refused wherever it points (validation would read a file the dataset does
    not hold, and serving would later follow it): a file, a file inside, a folder."""
    outside = dataset.parent / f"outside-{dataset.name}"
    outside.mkdir()
    Image.new("RGB", (40, 40), "red").save(outside / "a2.png")
    target = {"outside": outside / "a2.png", "inside": dataset / "images" / "a1.png"}.get(link)
    if target is None:
        (dataset / "linked").symlink_to(outside, target_is_directory=True)
        _edit(dataset, ADS_FILE, _set("ad_id", "a2", "image_path", "linked/a2.png"))
    else:
        (dataset / "images" / "a2.png").unlink()
        (dataset / "images" / "a2.png").symlink_to(target)
    failure = _only_failure(validate_dataset(dataset, CFG), SYMLINK_RULE)
    assert failure.examples == ["linked/a2.png" if link == "folder" else "images/a2.png"]


def test_new_ads_folder_with_a_symlinked_image_is_refused_by_name(tmp_path):
    from components.catalogue.validate import validate_new_ads

    folder = tmp_path / "new"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(folder / "images" / "ok.png")
    (folder / "images" / "secret.png").symlink_to("/etc/passwd")
    pd.DataFrame({"ad_id": ["ok", "sneaky"], "title": ["a", "b"],
                  "image_path": ["images/ok.png", "images/secret.png"]}).to_parquet(folder / ADS_FILE, index=False)
    result = validate_new_ads(folder, CFG)
    failure = _only_failure(result, SYMLINK_RULE)
    assert failure.examples == ["images/secret.png"]
    with pytest.raises(ValidationError, match="images/secret.png"):
        result.raise_if_failed()
