"""The coco source: COCO and Karpathy captions files, splits, subsets, and errors named by file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from components.data.build import build_dataset
from components.data.coco import build_coco
from components.data.config import CocoConfig, DataConfig
from components.data.format import read_dataset
from components.data.splits import assign_splits

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def _make_image(path: Path, index: int, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), COLOURS[index % len(COLOURS)]).save(path, format=fmt)
    return path


def _coco_file(tmp_path: Path, *, with_split: bool = True, num_images: int = 4) -> tuple[Path, Path]:
    """A COCO captions file with `num_images` images (PNG, JPEG, WebP, then BMP), two captions each."""
    images_dir = tmp_path / "imgs"
    formats = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")]
    splits = ["train", "val", "test", "restval"]
    images, annotations = [], []
    for i in range(num_images):
        fmt, ext = formats[i % len(formats)]
        name = f"img_{i}.{ext}"
        _make_image(images_dir / name, i, fmt)
        entry = {"id": 100 + i, "file_name": name}
        if with_split:
            entry["split"] = splits[i % len(splits)]
        images.append(entry)
        for j in range(2):
            annotations.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": f"  a picture number {i} take {j} \n"})
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return captions, images_dir


def _cfg(captions: Path | None, images: Path | None, **kw) -> DataConfig:
    return DataConfig(source="coco", coco=CocoConfig(captions=captions, images=images), **{"max_ads": None, **kw})


def test_coco_with_split_end_to_end(tmp_path):
    captions, images_dir = _coco_file(tmp_path)
    result = build_dataset(_cfg(captions, images_dir), tmp_path / "out")
    ds = read_dataset(result.out_dir)
    ads = ds.ads.set_index("ad_id")
    assert list(ads.index) == ["coco:100", "coco:101", "coco:102", "coco:103"]
    assert (ads["title"] == "").all()
    assert ads["split"].to_dict() == {"coco:100": "train", "coco:101": "valid", "coco:102": "test", "coco:103": "train"}
    # PNG/JPEG/WebP are copied byte for byte; BMP is re-encoded as PNG.
    for i, ext in enumerate(["png", "jpg", "webp"]):
        stored = result.out_dir / ads.loc[f"coco:{100 + i}", "image_path"]
        assert stored.suffix == f".{ext}"
        assert stored.read_bytes() == (images_dir / f"img_{i}.{ext}").read_bytes()
    with Image.open(result.out_dir / ads.loc["coco:103", "image_path"]) as im:
        assert im.format == "PNG" and im.size == (48, 40)
    assert result.stats["images_reencoded_png"] == 1 and result.stats["split_source"] == "file"

    queries = ds.queries.set_index("query_id")
    assert len(queries) == 8
    assert queries.loc["c:1010", "text"] == "a picture number 1 take 0"
    assert queries.loc["c:1010", "split"] == "valid"
    assert len(ds.qrels) == 8 and (ds.qrels["relevance"] == 1).all()
    qrel = ds.qrels.set_index("query_id").loc["c:1021"]
    assert qrel["ad_id"] == "coco:102" and qrel["split"] == "test"
    # Captions live in queries.parquet only, never as titles.
    assert not any("picture" in t for t in ds.ads["title"])


def test_coco_without_split_is_seeded(tmp_path):
    captions, images_dir = _coco_file(tmp_path, with_split=False, num_images=12)
    ds_a, stats = build_coco(_cfg(captions, images_dir, seed=5), tmp_path / "a")
    ds_b, _ = build_coco(_cfg(captions, images_dir, seed=5), tmp_path / "b")
    assert stats["split_source"] == "seeded"
    expected = assign_splits([str(100 + i) for i in range(12)], DataConfig().split_fractions, 5)
    assert dict(zip(ds_a.ads["ad_id"], ds_a.ads["split"], strict=True)) == {f"coco:{k}": v for k, v in expected.items()}
    assert ds_a.ads.equals(ds_b.ads) and ds_a.queries.equals(ds_b.queries)
    split_of = dict(zip(ds_a.ads["ad_id"], ds_a.ads["split"], strict=True))
    assert (ds_a.qrels["ad_id"].map(split_of) == ds_a.qrels["split"]).all()
    assert (ds_a.queries.set_index("query_id").loc[ds_a.qrels["query_id"], "split"].to_numpy() == ds_a.qrels["split"].to_numpy()).all()


def test_max_ads_keeps_a_seeded_subset_with_its_captions(tmp_path):
    captions, images_dir = _coco_file(tmp_path, num_images=8)
    ds_a, stats = build_coco(_cfg(captions, images_dir, max_ads=3, seed=1), tmp_path / "a")
    ds_b, _ = build_coco(_cfg(captions, images_dir, max_ads=3, seed=1), tmp_path / "b")
    assert len(ds_a.ads) == 3 and list(ds_a.ads["ad_id"]) == list(ds_b.ads["ad_id"])
    assert stats["images_in_file"] == 8
    assert set(ds_a.qrels["ad_id"]) == set(ds_a.ads["ad_id"]) and len(ds_a.queries) == 6
    assert len(list((tmp_path / "a" / "images").iterdir())) == 3


def test_annotations_without_ids_use_their_index(tmp_path):
    images_dir = tmp_path / "imgs"
    _make_image(images_dir / "a.png", 0, "PNG")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": "a", "file_name": "a.png"}],
        "annotations": [{"image_id": "a", "caption": "red square"}, {"image_id": "a", "caption": "   "}],
    }))  # fmt: skip
    ds, stats = build_coco(_cfg(captions, images_dir), tmp_path / "out")
    assert list(ds.queries["query_id"]) == ["c:0"] and stats["empty_captions_skipped"] == 1


def test_karpathy_style_end_to_end(tmp_path):
    root = tmp_path / "coco"
    _make_image(root / "val2014" / "COCO_val2014_1.jpg", 0, "JPEG")
    _make_image(root / "train2014" / "COCO_train2014_2.jpg", 1, "JPEG")
    _make_image(root / "flat_3.png", 2, "PNG")  # no sub-folder: found directly under the root
    doc = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "imgid": 0, "cocoid": 1, "split": "val",
             "sentences": [{"raw": "A man riding a horse.", "sentid": 7}, {"raw": "Horse and rider.", "sentid": 8}]},
            {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "imgid": 1, "cocoid": 2, "split": "restval",
             "sentences": [{"raw": "Two dogs playing.", "sentid": 9}]},
            {"filepath": "val2014", "filename": "flat_3.png", "imgid": 2, "cocoid": 3, "split": "test",
             "sentences": [{"raw": " A red bus. ", "sentid": 10}]},
        ],
    }  # fmt: skip
    captions = root / "dataset_coco.json"
    captions.write_text(json.dumps(doc))
    result = build_dataset(_cfg(captions, root), tmp_path / "out")
    ds = read_dataset(result.out_dir)
    assert result.stats["style"] == "karpathy"
    assert dict(zip(ds.ads["ad_id"], ds.ads["split"], strict=True)) == {"coco:1": "valid", "coco:2": "train", "coco:3": "test"}
    assert dict(zip(ds.queries["query_id"], ds.queries["text"], strict=True)) == {
        "c:7": "A man riding a horse.", "c:8": "Horse and rider.", "c:9": "Two dogs playing.", "c:10": "A red bus.",
    }  # fmt: skip
    assert dict(zip(ds.qrels["query_id"], ds.qrels["ad_id"], strict=True))["c:8"] == "coco:1"


def test_images_default_to_the_captions_folder(tmp_path):
    captions, _ = _coco_file(tmp_path)
    # Put the images next to the captions file: cfg.coco.images unset.
    for p in (tmp_path / "imgs").iterdir():
        p.rename(tmp_path / p.name)
    ds, _ = build_coco(_cfg(captions, None), tmp_path / "out")
    assert len(ds.ads) == 4


# --- errors: each names the file and the field or image -----------------------------


def _write(tmp_path: Path, doc) -> Path:
    path = tmp_path / "captions.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.fixture
def images_dir(tmp_path) -> Path:
    _make_image(tmp_path / "imgs" / "a.png", 0, "PNG")
    _make_image(tmp_path / "imgs" / "b.png", 1, "PNG")
    return tmp_path / "imgs"


GOOD_IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("{not json", "invalid JSON"),
        ([1, 2], "top level must be a JSON object"),
        ({"annotations": []}, "missing key 'images'"),
        ({"images": GOOD_IMAGES}, "missing key 'annotations'"),
        ({"images": [], "annotations": []}, "'images' is empty"),
        ({"images": [{"id": 1, "file_name": "a.png"}, {"id": 2}], "annotations": []}, r"images\[1\] is missing key 'file_name'"),
        ({"images": [{"file_name": "a.png"}], "annotations": []}, r"images\[0\] is missing key 'id'"),
        ({"images": GOOD_IMAGES, "annotations": [{"image_id": 1}]}, r"annotations\[0\] is missing key 'caption'"),
        ({"images": GOOD_IMAGES, "annotations": [{"caption": "x"}]}, r"annotations\[0\] is missing key 'image_id'"),
        ({"images": GOOD_IMAGES, "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 99, "caption": "y"}]},
         r"annotations\[1\] refers to unknown image_id 99"),
        ({"images": GOOD_IMAGES, "annotations": [{"image_id": 1, "caption": 5}]}, r"annotations\[0\]\.caption must be a string"),
        ({"images": [{**GOOD_IMAGES[0], "split": "holdout"}, GOOD_IMAGES[1]], "annotations": []}, r"images\[0\]\.split is 'holdout'"),
        ({"images": [{**GOOD_IMAGES[0], "split": "train"}, GOOD_IMAGES[1]], "annotations": []}, r"images\[1\] has no 'split'"),
        ({"images": [GOOD_IMAGES[0], GOOD_IMAGES[0]], "annotations": []}, "duplicate image id '1'"),
        ({"images": GOOD_IMAGES, "annotations": [{"id": 3, "image_id": 1, "caption": "x"}, {"id": 3, "image_id": 2, "caption": "y"}]},
         "duplicate caption"),
        ({"images": [{"filename": "a.png", "cocoid": 1, "sentences": [{"tokens": ["x"]}]}]}, r"images\[0\]\.sentences\[0\] is missing key 'raw'"),
        ({"images": [{"cocoid": 1, "sentences": []}]}, r"images\[0\] is missing key 'filename'"),
        ({"images": [GOOD_IMAGES[0], {"id": 2, "file_name": "/etc/passwd"}], "annotations": []},
         r"images\[1\]\.file_name is an absolute path \('/etc/passwd'\)"),
        ({"images": [{"id": 1, "file_name": "../../secret.png"}], "annotations": []},
         r"images\[0\]\.file_name contains '\.\.' \('\.\./\.\./secret\.png'\)"),
        ({"images": [{"id": 1, "file_name": "sub\\..\\..\\x.png"}], "annotations": []}, r"images\[0\]\.file_name contains '\.\.'"),
        ({"images": [{"id": 1, "file_name": "C:\\x.png"}], "annotations": []}, r"images\[0\]\.file_name is an absolute path"),
        ({"images": [{"filename": "a.png", "filepath": "../up", "cocoid": 1, "sentences": []}]},
         r"images\[0\]\.filepath contains '\.\.'"),
    ],
)  # fmt: skip
def test_broken_captions_file_is_named(tmp_path, images_dir, doc, expected):
    path = _write(tmp_path, doc)
    with pytest.raises(ValueError, match=expected) as info:
        build_coco(_cfg(path, images_dir), tmp_path / "out")
    assert str(path) in str(info.value)


def test_missing_captions_file_is_named(tmp_path, images_dir):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="captions file not found") as info:
        build_coco(_cfg(missing, images_dir), tmp_path / "out")
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match="data.coco.captions is not set"):
        build_coco(_cfg(None, images_dir), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="data.coco.images"):
        build_coco(_cfg(_write(tmp_path, {"images": GOOD_IMAGES, "annotations": []}), tmp_path / "no_dir"), tmp_path / "out")


def test_missing_image_file_names_the_path_and_a_failed_build_leaves_nothing(tmp_path, images_dir):
    path = _write(tmp_path, {"images": [*GOOD_IMAGES, {"id": 3, "file_name": "gone.jpg"}], "annotations": []})
    out_dir = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(_cfg(path, images_dir), out_dir)
    message = str(info.value)
    assert str(images_dir / "gone.jpg") in message and "images[2]" in message and str(path) in message
    assert not out_dir.exists() and not out_dir.with_name("out.building").exists()


def test_unreadable_image_is_named(tmp_path, images_dir):
    (images_dir / "broken.jpg").write_bytes(b"this is not a jpeg")
    path = _write(tmp_path, {"images": [{"id": 9, "file_name": "broken.jpg"}], "annotations": []})
    with pytest.raises(ValueError, match="not a readable image") as info:
        build_coco(_cfg(path, images_dir), tmp_path / "out")
    assert str(images_dir / "broken.jpg") in str(info.value)


def test_coco_style_set_from_a_built_dataset_keeps_splits_and_drops_titles(synthetic_dataset_dir, tmp_path):
    """infra/coco_style_openclipart.py: every image keeps its split, has no title, and each of
    its captions (its title, its tag words) is a query relevant to that image alone."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "infra" / "coco_style_openclipart.py"
    captions = tmp_path / "captions.json"
    subprocess.run([sys.executable, str(script), str(synthetic_dataset_dir), str(captions)], check=True,
                   capture_output=True, cwd=script.parents[1])
    source = read_dataset(synthetic_dataset_dir)
    built, _ = build_coco(_cfg(captions, synthetic_dataset_dir), tmp_path / "coco")
    assert (built.ads["title"].fillna("") == "").all()
    assert len(built.ads) == len(source.ads)
    # image i of the captions file is ad coco:i, in the source's split
    expected = {f"coco:{i}": split for i, split in enumerate(source.ads["split"])}
    assert dict(zip(built.ads["ad_id"], built.ads["split"], strict=True)) == expected
    qrels = built.qrels[built.qrels["relevance"] > 0]
    assert qrels.groupby("query_id")["ad_id"].nunique().eq(1).all()
    texts = set(built.queries["text"].astype(str))
    assert set(source.ads["title"].astype(str)) - {""} <= texts
    positives = source.qrels[source.qrels["relevance"] > 0].sort_values(["ad_id", "query_id"])
    query_text = source.queries.set_index("query_id")["text"]
    for ad_id, group in list(positives.groupby("ad_id"))[:5]:  # an ad's tag words, as one caption
        words = dict.fromkeys(w for q in group["query_id"] for w in str(query_text[q]).split())
        assert " ".join(words) in texts, ad_id
