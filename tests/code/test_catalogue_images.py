"""An ad's image, from the file an advertiser sends to the bytes /image answers: stored under
the suffix of its detected format (never the name it came with), and found only under its
root (the dataset directory for `file:` refs, the catalogue cache for `run:` refs)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from components.catalogue.images import image_name, resolve_image
from components.catalogue.versions import local_dir

SCRIPT = "<script>alert(document.cookie)</script>"


def png_with_script(path: Path) -> Path:
    """A real PNG (Pillow reads it) that is also an HTML page to a browser that sniffs."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"<html><body>{SCRIPT}</body></html>")
    Image.new("RGB", (40, 40), "red").save(path, format="PNG", pnginfo=info)
    return path


def test_an_added_image_is_stored_under_its_detected_format_not_its_name(tmp_path):
    page = png_with_script(tmp_path / "x.html")
    assert SCRIPT.encode() in page.read_bytes()
    assert image_name(page).endswith(".png")
    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), "blue").save(jpeg, format="JPEG")
    assert image_name(jpeg).endswith(".jpg")
    webp = tmp_path / "photo"
    Image.new("RGB", (40, 40), "green").save(webp, format="WEBP")
    assert image_name(webp).endswith(".webp")
    # The same bytes under another name: the same stored name.
    (tmp_path / "y.png").write_bytes(page.read_bytes())
    assert image_name(tmp_path / "y.png") == image_name(page)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_an_image_of_another_format_has_no_stored_name(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="PNG, JPEG or WebP"):
        image_name(path)


# --------------------------------------------------------------------------- where an image is found


def _png(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), colour).save(path, format="PNG")
    return path


@pytest.fixture
def dataset_with_links(tmp_path) -> Path:
    """A dataset directory with one real image, and ways out of it: a file beside it, a symlink
    to that file, a symlink to a file inside, a symlinked folder."""
    root = tmp_path / "dataset"
    _png(root / "images" / "a1.png")
    _png(tmp_path / "outside.png", "blue")
    (root / "images" / "out.png").symlink_to(tmp_path / "outside.png")
    (root / "images" / "in.png").symlink_to(root / "images" / "a1.png")
    (root / "linked").symlink_to(tmp_path, target_is_directory=True)
    return root


def test_a_file_ref_is_found_only_under_its_dataset_directory(dataset_with_links, tmp_path):
    root = dataset_with_links
    cache = tmp_path / "cache"
    assert resolve_image(f"file:{root / 'images' / 'a1.png'}", cache, dataset_dir=root) == root / "images" / "a1.png"
    refused = [f"file:{tmp_path / 'outside.png'}", "file:/etc/passwd", f"file:{root}/images/../../outside.png",
               f"file:{root / 'images' / 'out.png'}", f"file:{root / 'images' / 'in.png'}",
               f"file:{root / 'linked' / 'outside.png'}", f"file:{root / 'images'}", "file:images/a1.png"]
    for ref in refused:
        assert resolve_image(ref, cache, dataset_dir=root) is None, ref
    # No dataset directory known (live.reindex reading images to re-encode them, never serving
    # them): still no symlink on the way, nor a relative or `..` path.
    assert resolve_image(f"file:{root / 'images' / 'a1.png'}", cache) == root / "images" / "a1.png"
    for ref in (f"file:{root / 'images' / 'out.png'}", f"file:{root / 'linked' / 'outside.png'}",
                f"file:{root}/images/../images/a1.png", "file:images/a1.png"):
        assert resolve_image(ref, cache) is None, ref


def test_a_run_ref_is_found_only_in_the_catalogue_cache(tmp_path, monkeypatch):
    import mlflow

    def no_download(**kwargs):
        raise AssertionError(f"downloaded {kwargs}")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    cache = tmp_path / "cache"
    cached = _png(local_dir(cache, "0123abcd") / "images" / "x.png")
    _png(tmp_path / "outside.png", "blue")
    (cached.parent / "link.png").symlink_to(tmp_path / "outside.png")
    assert resolve_image("run:0123abcd/images/x.png", cache) == cached
    for ref in ("run:0123abcd/images/link.png", "run:../images/x.png", "run:0123abcd/images/../../x.png",
                "run:0123abcd/images/sub/x.png", "run:0123abcd/other/x.png", "run:0123abcd/images/.x.png",
                "run:/etc/images/x.png", "run:0123abcd/images/", "ftp://host/x.png"):
        assert resolve_image(ref, cache) is None, ref


def test_an_uncached_run_image_downloads_that_image_alone(tmp_path, monkeypatch):
    """Not the whole catalogue version it belongs to (embeddings, index, every image)."""
    import mlflow

    calls = []

    def download(*, run_id, artifact_path, dst_path):
        calls.append((run_id, artifact_path))
        return str(_png(Path(dst_path) / artifact_path))

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    cache = tmp_path / "cache"
    found = resolve_image("run:0123abcd/images/x.png", cache)
    assert calls == [("0123abcd", "catalogue/images/x.png")]
    assert found is not None and found.is_file() and found.resolve().is_relative_to((cache / "catalogue").resolve())
    assert resolve_image("run:0123abcd/images/x.png", cache) == found and len(calls) == 1  # cached now

    def gone(**kwargs):
        raise OSError("no such artifact")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", gone)
    assert resolve_image("run:0123abcd/images/y.png", cache) is None


def _toy_bundle(bundle: Path, ad_ids: list[str]) -> Path:
    import numpy as np
    import pandas as pd

    from components.retrieve.index import AdIndex
    from components.search.bundle import CATALOGUE_FILE, INDEX_DIR, WORD_VECTORS_FILE
    from components.search.catalogue import write_word_vectors

    vectors = np.random.default_rng(0).normal(size=(len(ad_ids), 8)).astype(np.float32)
    AdIndex.build(ad_ids, vectors).save(bundle / INDEX_DIR)
    pd.DataFrame({"ad_id": ad_ids, "title": ad_ids, "words": [["w"]] * len(ad_ids),
                  "scores": [[1.0]] * len(ad_ids)}).to_parquet(bundle / CATALOGUE_FILE, index=False)
    write_word_vectors(bundle / WORD_VECTORS_FILE, {"w": vectors[0]}, 8)
    return bundle


def test_the_bundle_catalogue_records_only_images_inside_its_dataset(dataset_with_links, tmp_path):
    """The training dataset's ads.parquet is read when a catalogue opens: an absolute path or one
    leading out of the directory gives the ad no image (absolute refs to files under it)."""
    import pandas as pd

    from components.search.bundle import bundle_catalogue

    root = dataset_with_links
    paths = {"a1": "images/a1.png", "abs": "/etc/passwd", "up": "../outside.png", "none": None,
             "dot": "./images/a1.png"}
    pd.DataFrame({"ad_id": list(paths), "title": list(paths), "image_path": list(paths.values()),
                  "split": "test"}).to_parquet(root / "ads.parquet", index=False)
    catalogue = bundle_catalogue(_toy_bundle(tmp_path / "bundle", list(paths)), dataset_dir=root)
    refs = dict(zip(catalogue.ads["ad_id"], catalogue.ads["image_ref"], strict=True))
    real = root.resolve()
    assert refs == {"a1": f"file:{real / 'images' / 'a1.png'}", "abs": "", "up": "", "none": "",
                    "dot": f"file:{real / 'images' / 'a1.png'}"}


def test_the_pyfunc_caches_catalogues_where_it_is_told_or_per_user(tmp_path, monkeypatch):
    """Never a fixed path in the shared temporary directory (anyone could plant a catalogue there)."""
    from components.catalogue.pyfunc import catalogue_cache_dir

    assert catalogue_cache_dir({"cache_dir": str(tmp_path / "c")}) == tmp_path / "c"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalogue_cache_dir({}) == tmp_path / "xdg" / "alignsearch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert catalogue_cache_dir({}) == tmp_path / "home" / ".cache" / "alignsearch"
    assert "alignsearch-catalogue" not in str(catalogue_cache_dir({}))
