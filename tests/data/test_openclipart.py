"""The openclipart source: each rule of the build protocol (docs/benchmark.md#building-the-dataset), on tiny hand-made trees.

Every test builds its own SVGs under tmp_path (see svg_fixtures.py); nothing reads the
installed clip art. Each rule has a test that fails when the rule is dropped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from svg_fixtures import (
    CREATOR,
    MALFORMED_SVG,
    PUBLISHER,
    TINY_BLANK,
    TINY_EXPECTED_ADS,
    TINY_EXPECTED_RELEVANT,
    TINY_EXPECTED_VOCABULARY,
    TINY_LINK,
    TINY_MALFORMED,
    link,
    svg_document,
    write_svg,
    write_tiny_tree,
)

from components.data import openclipart as oc
from components.data.build import build_dataset
from components.data.config import DataConfig
from components.data.format import README_FILE, SPLITS, read_dataset

IMAGE_SIZE = 64


def tiny_config(svg_root: Path, cache_dir: Path, **overrides) -> DataConfig:
    values = dict(
        source="openclipart",
        svg_root=svg_root,
        cache_dir=cache_dir,
        max_ads=None,
        seed=0,
        image_size=IMAGE_SIZE,
        title_group_cap=3,
        tag_min_ads=2,
        tag_max_ad_share=0.7,
        pair_min_ads=2,
        raster_timeout_s=20,
        workers=2,
    )
    values.update(overrides)
    return DataConfig(**values)


def clipart(ad_id: str, title: str = "t", tags=(), authors=(), folders=()) -> oc.ClipArt:
    return oc.ClipArt(
        ad_id=ad_id,
        rel_path=f"{ad_id}.svg",
        path=Path(f"/nowhere/{ad_id}.svg"),
        title=title,
        description="",
        tags=tuple(tags),
        authors=frozenset(authors),
        folders=frozenset(folders),
        sha256="0" * 64,
    )


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    return write_tiny_tree(tmp_path / "svg")




# --- metadata --------------------------------------------------------------------------


def test_missing_svg_root_says_how_to_install(tmp_path):
    cfg = tiny_config(tmp_path / "absent", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="apt-get install -y openclipart-svg.*--svg-root"):
        oc.build_openclipart(cfg, tmp_path / "out")


def test_parse_reads_the_work_title_not_agent_titles():
    data = svg_document("Red Apple", ["fruit", "Apple_Tree"], description="a shiny apple").encode()
    meta = oc.parse_svg_metadata(data)
    assert meta.title == "Red Apple"  # the agents' dc:title comes first in the document
    assert meta.description == "a shiny apple"
    assert meta.tags == ("fruit", "Apple_Tree")
    assert set(meta.agents) == {CREATOR, PUBLISHER}
    assert meta.has_work


def test_parse_without_work_gives_empty_metadata():
    data = b'<svg xmlns="http://www.w3.org/2000/svg"><title>x</title><rect width="1" height="1"/></svg>'
    meta = oc.parse_svg_metadata(data)
    assert (meta.title, meta.tags, meta.has_work) == ("", (), False)


def test_parse_rejects_malformed_xml():
    with pytest.raises(oc.MalformedSvgError):
        oc.parse_svg_metadata(MALFORMED_SVG.encode())


def test_author_prefix_is_stripped_from_titles():
    assert oc.strip_author_prefix("Clipart by Nicu Buculei - baloon1_04") == "baloon1_04"
    assert oc.strip_author_prefix("clipart by Jon A. Cruz - Tux - penguin") == "Tux - penguin"
    assert oc.strip_author_prefix("Clipart of cats") == "Clipart of cats"
    assert oc.strip_author_prefix("Stars - by Nicu") == "Stars - by Nicu"


def test_normalisation_of_tags_and_titles():
    assert oc.normalise_tag("  Apple_Tree ") == "apple tree"
    assert oc.normalise_tag("SIGNS_and_symbols") == "signs and symbols"
    assert (
        oc.normalise_title("  Part of the Flat-Icon   collection!! ")
        == "part of the flat icon collection"
    )
    assert oc.normalise_title("cat!") == oc.normalise_title("CAT") == "cat"
    assert oc.folder_names("signs_and_symbols/flags/Europe") == {
        "signs and symbols",
        "flags",
        "europe",
    }


def test_symlink_counted_once_with_the_real_path(tmp_path):
    root = tmp_path / "svg"
    write_svg(root, "animals/cat.svg", "Cat")
    link(root, "people/pets/cat.svg", "animals/cat.svg")
    (root / "misc").mkdir()
    (root / "misc/gone.svg").symlink_to(root / "nowhere.svg")
    files, stats = oc.find_svg_files(root)
    assert [f.rel_path for f in files] == ["animals/cat.svg"]
    assert files[0].alias_folders == ("people/pets",)
    items, _ = oc.read_clipart(files, workers=1)
    assert items[0].folders == {"animals", "people", "pets"}  # a "pets" tag is a folder name too
    assert stats == {
        "svg_paths_seen": 3,
        "symlinks": 2,
        "broken_symlinks": 1,
        "real_files": 1,
        "symlinks_skipped": 1,
    }


def test_malformed_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "svg"
    write_svg(root, "a/good.svg", "Good", ["x"])
    (root / "a/bad.svg").write_text(MALFORMED_SVG)
    (root / "a/empty.svg").write_bytes(b"")
    files, _ = oc.find_svg_files(root)
    items, stats = oc.read_clipart(files, workers=1)
    assert [i.ad_id for i in items] == ["a/good"]
    assert stats["malformed_xml_skipped"] == 2


def test_parallel_parse_equals_serial(tiny_tree, monkeypatch):
    files, _ = oc.find_svg_files(tiny_tree)
    paths = [str(f.path) for f in files]
    serial = oc.parse_svg_files(paths, workers=1)
    monkeypatch.setattr(oc, "_PARALLEL_PARSE_MIN_FILES", 0)
    assert oc.parse_svg_files(paths, workers=2) == serial


# --- title cap and selection -------------------------------------------------------------


def test_cap_keeps_the_lowest_paths_of_each_title_group():
    items = [
        clipart("z/e", "Gramastar"),
        clipart("a/b", "gramastar!"),
        clipart("m/c", " GRAMASTAR "),
        clipart("a/a", "gramastar"),
        clipart("b/d", "Gramastar."),
        clipart("q/one", "Unique"),
    ]
    kept = oc.cap_title_groups(items, cap=3)
    assert [i.ad_id for i in kept] == ["a/a", "a/b", "b/d", "q/one"]


def first_by_rank(items, max_ads: int, seed: int) -> list[str]:
    """The ids of the first `max_ads` items in the seeded selection order, sorted."""
    return sorted(i.ad_id for i in oc.rank_for_selection(items, seed)[:max_ads])


def test_max_ads_selection_is_seeded_and_order_independent():
    items = [clipart(f"c/item_{n:02d}") for n in range(40)]
    chosen = first_by_rank(items, 10, seed=3)
    assert len(chosen) == 10
    assert first_by_rank(list(reversed(items)), 10, seed=3) == chosen
    assert first_by_rank(items, 10, seed=4) != chosen
    assert sorted(i.ad_id for i in oc.rank_for_selection(items, seed=3)) == [i.ad_id for i in items]


# --- tags ------------------------------------------------------------------------------


def test_clean_tags_drops_authors_and_folder_names():
    authors = {oc.normalise_tag(CREATOR)}
    folders = oc.folder_names("signs_and_symbols/flags")
    tags = oc.clean_tags(
        ["Flag", "Jane_Doe", "flags", "Signs_and_Symbols", " red ", ""], authors, folders
    )
    assert tags == {"flag", "red"}


def test_filter_tags_drops_too_frequent_and_too_rare():
    # 10 ads; max share 0.5 -> more than 5 ads is too frequent; min 2 ads.
    ad_tags = {f"a{n}": {"everywhere"} for n in range(10)}
    for n in range(5):
        ad_tags[f"a{n}"] |= {"half"}  # exactly 50%: kept
    ad_tags["a0"] |= {"twice"}
    ad_tags["a1"] |= {"twice"}  # exactly min_ads: kept
    ad_tags["a2"] |= {"once"}
    filtered, vocabulary, stats = oc.filter_tags(
        {k: frozenset(v) for k, v in ad_tags.items()}, max_ad_share=0.5, min_ads=2
    )
    assert vocabulary == ["half", "twice"]
    assert filtered["a0"] == {"half", "twice"} and filtered["a9"] == frozenset()
    assert stats["tags_dropped_too_frequent"] == 1 and stats["tags_dropped_too_rare"] == 1


# --- splits and queries ----------------------------------------------------------------


def test_split_by_title_group_never_leaks_a_group():
    items = [
        clipart(f"g{g:02d}/ad{k}", title=f"Title {word}" + "!" * k)
        for g, word in enumerate(f"{a}{b}" for a in "abcdef" for b in "xyzuv")
        for k in range(3)
    ]
    ad_split = oc.split_by_title_group(items, {"train": 0.7, "valid": 0.1, "test": 0.2}, seed=0)
    by_group: dict[str, set[str]] = {}
    for item in items:
        by_group.setdefault(item.title_group, set()).add(ad_split[item.ad_id])
    assert len(by_group) == 30
    assert all(len(splits) == 1 for splits in by_group.values())
    assert set(ad_split.values()) == set(SPLITS)


def test_relevance_is_tag_superset_and_queries_exist_per_split():
    ad_tags = {
        "a1": frozenset({"cat", "pet", "black"}),
        "a2": frozenset({"cat", "pet"}),
        "a3": frozenset({"cat"}),
        "a4": frozenset({"pet", "dog"}),
        "a5": frozenset({"cat", "pet"}),
    }
    ad_split = {"a1": "train", "a2": "train", "a3": "train", "a4": "train", "a5": "test"}
    vocabulary = ["black", "cat", "dog", "pet"]
    queries, qrels, stats = oc.build_queries(ad_tags, ad_split, vocabulary, pair_min_ads=3)
    relevant = qrels.groupby("query_id")["ad_id"].apply(set).to_dict()
    assert relevant["q:train:cat pet"] == {"a1", "a2"}  # a3 has only "cat", a4 only "pet"
    assert relevant["q:test:cat pet"] == {"a5"}
    assert relevant["q:train:cat"] == {"a1", "a2", "a3"}
    assert "q:test:dog" not in relevant and "q:test:dog" not in set(queries["query_id"])
    assert not any("black cat" in q for q in queries["query_id"])  # co-occurs on 1 ad < 3
    assert (stats["single_tag_queries"], stats["pair_queries"]) == (4, 1)
    assert (qrels["relevance"] == 1).all()
    assert queries["query_id"].is_unique
    merged = qrels.merge(queries, on="query_id", suffixes=("", "_query"))
    assert (merged["split"] == merged["split_query"]).all()
    assert (merged["ad_id"].map(ad_split) == merged["split"]).all()


def test_pair_whose_text_equals_a_tag_is_dropped():
    ad_tags = {f"a{n}": frozenset({"ice", "cream"}) for n in range(3)}
    ad_tags |= {"b1": frozenset({"cream ice"}), "b2": frozenset({"cream ice"})}
    queries, qrels, stats = oc.build_queries(
        ad_tags, dict.fromkeys(ad_tags, "train"), ["cream", "cream ice", "ice"], pair_min_ads=2
    )
    assert sorted(queries["text"]) == ["cream", "cream ice", "ice"]
    assert set(qrels.loc[qrels["query_id"] == "q:train:cream ice", "ad_id"]) == {"b1", "b2"}
    assert stats["pair_queries_dropped_text_collision"] == 1


# --- the whole build -------------------------------------------------------------------


def test_build_applies_every_rule_on_the_tiny_tree(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree, tmp_path / "cache")
    dataset, stats = oc.build_openclipart(cfg, tmp_path / "out")
    ads = dataset.ads.set_index("ad_id")
    # symlink once (real path), malformed skipped, cap kept cat_a..c, blank dropped, prefix stripped.
    assert ads["title"].to_dict() == TINY_EXPECTED_ADS
    assert ads.loc["animals/cats/cat_a", "category"] == "animals"
    assert (stats["svg_paths_seen"], stats["symlinks_skipped"], stats["real_files"]) == (12, 1, 11)
    assert stats["malformed_xml_skipped"] == 1
    assert (stats["ads_before_cap"], stats["ads_after_cap"]) == (10, 9)
    assert (stats["raster_blank"], stats["raster_failures"], stats["ads_after_max_ads"]) == (
        1,
        0,
        8,
    )
    assert stats["author_prefix_stripped"] == 1
    assert stats["tag_vocabulary"] == len(TINY_EXPECTED_VOCABULARY)
    # every ad of a title group in one split
    groups = dataset.ads.assign(group=dataset.ads["title"].map(oc.normalise_title))
    assert (groups.groupby("group")["split"].nunique() == 1).all()
    # queries: each vocabulary tag plus the two frequent pairs; qrels = tag supersets
    relevant: dict[str, set[str]] = {}
    for row in dataset.qrels.merge(dataset.queries, on="query_id").itertuples():
        relevant.setdefault(row.text, set()).add(row.ad_id)
    assert relevant == TINY_EXPECTED_RELEVANT
    assert (stats["single_tag_queries"], stats["pair_queries"]) == (4, 2)
    for image_path in dataset.ads["image_path"]:
        with Image.open(tmp_path / "out" / image_path) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_second_build_is_served_from_the_raster_cache(tiny_tree, tmp_path, counting_renderer):
    cfg = tiny_config(tiny_tree, tmp_path / "cache")
    first, first_stats = oc.build_openclipart(cfg, tmp_path / "out1")
    rendered = len(counting_renderer)
    assert rendered == first_stats["raster_rendered"] == 9  # 8 ads + the blank one
    second, second_stats = oc.build_openclipart(cfg, tmp_path / "out2")
    assert len(counting_renderer) == rendered  # nothing rendered again
    assert second_stats["raster_cache_hits"] == second_stats["raster_attempted"] == 9
    assert second_stats["raster_blank"] == 1
    pd.testing.assert_frame_equal(first.ads, second.ads)
    for image_path in first.ads["image_path"]:
        assert (tmp_path / "out1" / image_path).read_bytes() == (
            tmp_path / "out2" / image_path
        ).read_bytes()


def test_max_ads_in_the_build_is_the_first_renderable_by_rank(tiny_tree, tmp_path, counting_renderer):
    cfg = tiny_config(tiny_tree, tmp_path / "cache", max_ads=3, seed=7)
    dataset, stats = oc.build_openclipart(cfg, tmp_path / "out")
    files, _ = oc.find_svg_files(tiny_tree)
    items, _ = oc.read_clipart(files, workers=1)
    renderable = [i for i in oc.cap_title_groups(items, 3) if i.rel_path != TINY_BLANK]
    assert sorted(dataset.ads["ad_id"]) == first_by_rank(renderable, 3, seed=7)
    assert stats["ads_after_max_ads"] == 3
    assert len(counting_renderer) <= 4  # renders stop once 3 images succeeded


def test_build_dataset_end_to_end(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree, tmp_path / "cache", out_dir=tmp_path / "dataset")
    result = build_dataset(cfg)
    out = result.out_dir
    assert {p.name for p in out.iterdir()} == {
        "ads.parquet",
        "queries.parquet",
        "qrels.parquet",
        "images",
        README_FILE,
    }
    dataset = read_dataset(out)
    assert set(dataset.ads["ad_id"]) == set(TINY_EXPECTED_ADS)
    assert all((out / p).is_file() for p in dataset.ads["image_path"])
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == sorted(
        dataset.ads["image_path"]
    )
    assert result.counts["ads"]["total"] == len(TINY_EXPECTED_ADS)
    assert result.counts["positive_qrels"]["total"] == len(dataset.qrels) == 18
    readme = (out / README_FILE).read_text()
    assert "source: openclipart" in readme
    assert (
        f"{'ads':<16}" in readme
        and "malformed_xml_skipped: 1" in readme
        and "symlinks_skipped: 1" in readme
    )
    assert TINY_MALFORMED.removesuffix(".svg") not in set(dataset.ads["ad_id"])
    assert TINY_LINK[0].removesuffix(".svg") not in set(dataset.ads["ad_id"])
