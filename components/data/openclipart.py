"""The openclipart source: the real benchmark dataset, built from the Open Clip Art Library.

This module owns every rule of the build protocol in docs/benchmark.md#building-the-dataset: scanning the SVG tree
(symlinks counted once), reading each file's RDF metadata, capping repeated titles, the
seeded `max_ads` selection (among the ads that rasterise, through raster.py's cache),
cleaning tags into a ground-truth vocabulary, the split by title group, and the tag
queries with their qrels. Tags are ground truth only; they never become model input.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from lxml import etree

from components.data.config import DataConfig
from components.data.format import IMAGES_DIR, Dataset
from components.data.raster import (
    RASTER_CACHE_SUBDIR,
    raster_cache_key,
    rasterise_svgs,
    renderer_version,
)
from components.data.splits import assign_splits

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `apt-get install -y openclipart-svg` (Debian/Ubuntu, as root) "
    "or pass --svg-root DIR"
)
# Below this many files a process pool costs more than it saves.
_PARALLEL_PARSE_MIN_FILES = 256
_PARSE_CHUNKSIZE = 64

_AUTHOR_PREFIX = re.compile(r"^\s*clipart by\s+.+?\s+-(?:\s+|$)", re.IGNORECASE)
# Numbered series ("gramastar 017", "flag 2") are one title group: digits are separators.
_NON_TITLE_WORD = re.compile(r"[\W_\d]+")
_WHITESPACE = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


class MalformedSvgError(ValueError):
    """An SVG file that a strict XML parser rejects."""


@dataclass(frozen=True)
class SvgFile:
    """One real SVG file under the root; symlinks to it only add `alias_folders`."""

    path: Path  # the real file, symlinks resolved
    rel_path: str  # posix path relative to the root, e.g. "animals/cat_01.svg"
    alias_folders: tuple[str, ...] = ()  # relative folders of symlinks pointing at it


@dataclass(frozen=True)
class SvgMetadata:
    """What one SVG says about itself in its RDF metadata (raw, not yet normalised)."""

    title: str  # dc:title of the cc:Work ("" when absent)
    description: str  # dc:description of the cc:Work
    tags: tuple[str, ...]  # rdf:li texts inside the cc:Work's dc:subject
    agents: tuple[str, ...]  # dc:title of every cc:Agent (creator, rights, publisher)
    has_work: bool  # whether a cc:Work element exists at all


@dataclass(frozen=True)
class ParsedFile:
    """The result of reading one file in a worker: metadata or the reason there is none."""

    path: str
    sha256: str
    metadata: SvgMetadata | None
    error: str | None  # "malformed: ..." or "unreadable: ..."


@dataclass(frozen=True)
class ClipArt:
    """A candidate ad: one real SVG with its cleaned title and raw tags."""

    ad_id: str  # rel_path without ".svg"
    rel_path: str
    path: Path
    title: str  # "Clipart by <author> - " already stripped
    description: str
    tags: tuple[str, ...]  # raw tags, as in the file
    authors: frozenset[str]  # normalised cc:Agent titles
    folders: frozenset[str]  # normalised folder names of the file and of its symlinks
    sha256: str

    @property
    def category(self) -> str:
        return self.ad_id.split("/", 1)[0] if "/" in self.ad_id else ""

    @property
    def title_group(self) -> str:
        return normalise_title(self.title)


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def normalise_tag(text: str) -> str:
    """Lowercase, `_` to space, whitespace stripped (and inner runs collapsed to one space)."""
    return _WHITESPACE.sub(" ", text.lower().replace("_", " ")).strip()


def normalise_title(title: str) -> str:
    """The title-group key: lowercase, runs of whitespace/punctuation/digits collapsed to one
    space, so numbered items of one series share a group."""
    return _NON_TITLE_WORD.sub(" ", title.lower()).strip()


def strip_author_prefix(title: str) -> str:
    """Drop a leading "Clipart by <author> - " (the library's machine-made title prefix)."""
    return _AUTHOR_PREFIX.sub("", title, count=1).strip()


def folder_names(rel_folder: str) -> set[str]:
    """Every component of a relative folder ("a/b_c" -> {"a", "b c"}), normalised like tags."""
    return {normalise_tag(part) for part in Path(rel_folder).parts if normalise_tag(part)}


# ---------------------------------------------------------------------------------------
# Step 1: scan the tree and read metadata
# ---------------------------------------------------------------------------------------


def check_svg_root(svg_root: Path) -> Path:
    """The resolved root, or a FileNotFoundError that says how to get the clip art."""
    svg_root = Path(svg_root)
    if not svg_root.is_dir():
        raise FileNotFoundError(f"openclipart SVG folder {svg_root} not found: {INSTALL_HINT}")
    return Path(os.path.realpath(svg_root))


def find_svg_files(svg_root: Path) -> tuple[list[SvgFile], dict[str, int]]:
    """All real `.svg` files under `svg_root`, each once, sorted by relative path.

    A symlink adds nothing but its folder (kept as an alias folder of the real file, so a
    tag naming that folder is dropped too); the ad keeps the real file's path. Symlinked
    directories are not followed. A symlink whose target lies outside the root stands for
    that target under its own path.
    """
    root = check_svg_root(svg_root)
    real_paths: dict[str, str] = {}  # real path -> relative path
    aliases: dict[str, list[str]] = defaultdict(list)  # real path -> link folders
    outside: dict[str, str] = {}  # real path outside root -> lowest link rel path
    stats = Counter(svg_paths_seen=0, symlinks=0, broken_symlinks=0)
    for dir_path, dir_names, file_names in os.walk(root):
        dir_names.sort()
        for name in sorted(file_names):
            if not name.lower().endswith(".svg"):
                continue
            path = os.path.join(dir_path, name)
            rel = Path(path).relative_to(root).as_posix()
            stats["svg_paths_seen"] += 1
            if not os.path.islink(path):
                real_paths[path] = rel
                continue
            stats["symlinks"] += 1
            target = os.path.realpath(path)
            if not os.path.isfile(target):
                stats["broken_symlinks"] += 1
                continue
            aliases[target].append(Path(rel).parent.as_posix())
            if not target.startswith(str(root) + os.sep):
                outside[target] = min(outside.get(target, rel), rel)
    for target, rel in outside.items():
        real_paths.setdefault(target, rel)
    files = [
        SvgFile(
            path=Path(real), rel_path=rel, alias_folders=tuple(sorted(set(aliases.get(real, ()))))
        )
        for real, rel in real_paths.items()
    ]
    files.sort(key=lambda f: f.rel_path)
    stats["real_files"] = len(files)
    stats["symlinks_skipped"] = stats["symlinks"] - stats["broken_symlinks"] - len(outside)
    return files, dict(stats)


def _text_of(element) -> str:
    return _WHITESPACE.sub(" ", "".join(element.itertext())).strip()


def parse_svg_metadata(data: bytes) -> SvgMetadata:
    """Read title, description, tags and agent names from an SVG's RDF metadata.

    The title is the `dc:title` directly inside the `cc:Work`; titles inside `cc:Agent`
    are author names and are returned as `agents`. Elements are matched by local name so
    both the old (web.resource.org/cc) and new (creativecommons.org/ns#) namespaces work.
    Raises `MalformedSvgError` when the bytes are not well-formed XML.
    """
    try:
        root = etree.fromstring(data, parser=etree.XMLParser(no_network=True))
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise MalformedSvgError(str(exc)) from exc
    if root is None:
        raise MalformedSvgError("empty document")
    agents = tuple(
        text
        for agent in root.iter("{*}Agent")
        for title in agent.iterchildren("{*}title")
        if (text := _text_of(title))
    )
    work = next(root.iter("{*}Work"), None)
    if work is None:
        return SvgMetadata(title="", description="", tags=(), agents=agents, has_work=False)
    title = next((_text_of(e) for e in work.iterchildren("{*}title")), "")
    description = next((_text_of(e) for e in work.iterchildren("{*}description")), "")
    tags = tuple(
        text
        for subject in work.iterchildren("{*}subject")
        for li in subject.iter("{*}li")
        if (text := _text_of(li))
    )
    return SvgMetadata(
        title=title, description=description, tags=tags, agents=agents, has_work=True
    )


def parse_svg_file(path: str) -> ParsedFile:
    """Read one file: its sha256 (the raster cache key) and its metadata. Never raises."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ParsedFile(path=path, sha256="", metadata=None, error=f"unreadable: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        return ParsedFile(path=path, sha256=digest, metadata=parse_svg_metadata(data), error=None)
    except MalformedSvgError as exc:
        return ParsedFile(path=path, sha256=digest, metadata=None, error=f"malformed: {exc}")


def parse_svg_files(paths: Sequence[str], workers: int) -> list[ParsedFile]:
    """Parse files in input order, in a process pool when there are enough of them."""
    if workers <= 1 or len(paths) < _PARALLEL_PARSE_MIN_FILES:
        return [parse_svg_file(p) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(parse_svg_file, paths, chunksize=_PARSE_CHUNKSIZE))


def read_clipart(files: Sequence[SvgFile], workers: int) -> tuple[list[ClipArt], dict[str, int]]:
    """Parse every file into a `ClipArt`; malformed and unreadable files are skipped and counted."""
    parsed = parse_svg_files([str(f.path) for f in files], workers)
    items: list[ClipArt] = []
    stats = Counter(
        malformed_xml_skipped=0, unreadable_skipped=0, no_work_metadata=0, author_prefix_stripped=0
    )
    for svg, result in zip(files, parsed, strict=True):
        if result.metadata is None:
            kind = (
                "malformed_xml_skipped"
                if (result.error or "").startswith("malformed")
                else "unreadable_skipped"
            )
            stats[kind] += 1
            log.debug("skipping %s (%s)", svg.rel_path, result.error)
            continue
        meta = result.metadata
        stats["no_work_metadata"] += not meta.has_work
        title = strip_author_prefix(meta.title)
        stats["author_prefix_stripped"] += title != meta.title.strip()
        folders = folder_names(Path(svg.rel_path).parent.as_posix())
        for alias in svg.alias_folders:
            folders |= folder_names(alias)
        items.append(
            ClipArt(
                ad_id=svg.rel_path[: -len(".svg")],
                rel_path=svg.rel_path,
                path=svg.path,
                title=title,
                description=meta.description,
                tags=meta.tags,
                authors=frozenset(a for a in map(normalise_tag, meta.agents) if a),
                folders=frozenset(folders),
                sha256=result.sha256,
            )
        )
    return items, dict(stats)


# ---------------------------------------------------------------------------------------
# Step 2: title-group cap
# ---------------------------------------------------------------------------------------


def cap_title_groups(items: Iterable[ClipArt], cap: int) -> list[ClipArt]:
    """Keep at most `cap` items per normalised title, the lowest relative paths first."""
    groups: dict[str, list[ClipArt]] = defaultdict(list)
    for item in items:
        groups[item.title_group].append(item)
    kept = [
        item for group in groups.values() for item in sorted(group, key=lambda i: i.rel_path)[:cap]
    ]
    return sorted(kept, key=lambda i: i.rel_path)


# ---------------------------------------------------------------------------------------
# Steps 3-4: the seeded max_ads selection among the ads that rasterise (raster.py renders)
# ---------------------------------------------------------------------------------------


def selection_rank(ad_id: str, seed: int) -> str:
    """An item's place in the seeded selection order: a hash of (seed, ad_id), so the order
    depends only on the seed and the ids, never on how the items were listed."""
    return hashlib.sha256(f"{seed}\0{ad_id}".encode()).hexdigest()


def rank_for_selection(items: Iterable[ClipArt], seed: int) -> list[ClipArt]:
    return sorted(items, key=lambda i: selection_rank(i.ad_id, seed))


def rasterise_selection(
    ranked: Sequence[ClipArt], needed: int, cfg: DataConfig, workers: int
) -> tuple[list[ClipArt], dict[str, Path], dict[str, int]]:
    """Walk the seeded rank order and rasterise until `needed` ads have a usable image.

    Returns the selected items (sorted by path), {ad_id: cached PNG} and raster counts.
    Each round renders exactly the shortfall, so nothing past the cut is rendered and the
    result equals rasterising every kept ad and then taking the first `needed` by rank.
    """
    cache_dir = Path(cfg.cache_dir) / RASTER_CACHE_SUBDIR
    version = renderer_version()
    selected: list[ClipArt] = []
    pngs: dict[str, Path] = {}
    stats = Counter(
        raster_attempted=0,
        raster_cache_hits=0,
        raster_rendered=0,
        raster_failures=0,
        raster_blank=0,
        raster_cairosvg_fallback=0,
    )
    position = 0
    while len(selected) < needed and position < len(ranked):
        batch = ranked[position : position + needed - len(selected)]
        position += len(batch)
        keys = {
            item.ad_id: raster_cache_key(item.sha256, cfg.image_size, version) for item in batch
        }
        jobs = {keys[item.ad_id]: item.path for item in batch}  # identical files render once
        outcomes = rasterise_svgs(jobs, cache_dir, cfg.image_size, cfg.raster_timeout_s, workers)
        for item in batch:
            outcome = outcomes[keys[item.ad_id]]
            stats["raster_attempted"] += 1
            stats["raster_cache_hits"] += outcome.cached
            stats["raster_rendered"] += not outcome.cached
            stats["raster_cairosvg_fallback"] += outcome.renderer == "cairosvg"
            if outcome.status == "ok":
                selected.append(item)
                pngs[item.ad_id] = outcome.png_path
            elif outcome.status == "blank":
                stats["raster_blank"] += 1
            else:
                stats["raster_failures"] += 1
                log.debug("rasterisation failed for %s: %s", item.rel_path, outcome.detail)
    selected.sort(key=lambda i: i.rel_path)
    return selected, pngs, dict(stats)


def image_path_for(ad_id: str) -> str:
    """Where an ad's PNG lives, relative to the dataset directory (mirrors the SVG tree)."""
    return f"{IMAGES_DIR}/{ad_id}.png"


def copy_images(pngs: Mapping[str, Path], out_dir: Path) -> None:
    """Copy cached PNGs into the dataset (copies, not links: the dataset may be edited or
    tracked by DVC without touching the cache)."""
    for ad_id, png in pngs.items():
        target = out_dir / image_path_for(ad_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)


# ---------------------------------------------------------------------------------------
# Step 5: tags -> vocabulary
# ---------------------------------------------------------------------------------------


def clean_tags(
    raw_tags: Iterable[str], authors: Iterable[str], folders: Iterable[str]
) -> frozenset[str]:
    """One item's normalised tags minus its author names and its folder names."""
    drop = set(authors) | set(folders)
    return frozenset(t for t in map(normalise_tag, raw_tags) if t and t not in drop)


def filter_tags(
    ad_tags: Mapping[str, frozenset[str]], max_ad_share: float, min_ads: int
) -> tuple[dict[str, frozenset[str]], list[str], dict[str, int]]:
    """Drop tags on more than `max_ad_share` of the ads or on fewer than `min_ads` ads.

    Returns each ad's remaining tags, the sorted vocabulary and what was dropped.
    """
    counts = Counter(tag for tags in ad_tags.values() for tag in tags)
    limit = max_ad_share * len(ad_tags)
    too_frequent = {t for t, c in counts.items() if c > limit}
    too_rare = {t for t, c in counts.items() if c < min_ads} - too_frequent
    vocabulary = sorted(set(counts) - too_frequent - too_rare)
    keep = set(vocabulary)
    filtered = {ad_id: frozenset(tags & keep) for ad_id, tags in ad_tags.items()}
    stats = {
        "tags_before_filter": len(counts),
        "tags_dropped_too_frequent": len(too_frequent),
        "tags_dropped_too_rare": len(too_rare),
        "tag_vocabulary": len(vocabulary),
    }
    return filtered, vocabulary, stats


def tag_items(
    items: Iterable[ClipArt], cfg: DataConfig
) -> tuple[dict[str, frozenset[str]], list[str], dict[str, int]]:
    """Clean each kept item's tags, then filter over the kept items into the vocabulary."""
    items = list(items)
    cleaned: dict[str, frozenset[str]] = {}
    stats = Counter(tags_dropped_author=0, tags_dropped_folder=0)
    for item in items:
        normalised = {t for t in map(normalise_tag, item.tags) if t}
        stats["tags_dropped_author"] += len(normalised & item.authors)
        stats["tags_dropped_folder"] += len((normalised - item.authors) & item.folders)
        cleaned[item.ad_id] = clean_tags(item.tags, item.authors, item.folders)
    filtered, vocabulary, filter_stats = filter_tags(cleaned, cfg.tag_max_ad_share, cfg.tag_min_ads)
    stats.update(filter_stats)
    stats["ads_with_vocabulary_tags"] = sum(bool(tags) for tags in filtered.values())
    return filtered, vocabulary, dict(stats)


# ---------------------------------------------------------------------------------------
# Steps 6-8: ads, splits, queries and qrels
# ---------------------------------------------------------------------------------------


def split_by_title_group(
    items: Iterable[ClipArt], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
    """{ad_id: split}, with every ad of one normalised title in the same split."""
    items = list(items)
    group_split = assign_splits((i.title_group for i in items), fractions, seed)
    return {i.ad_id: group_split[i.title_group] for i in items}


def build_ads_table(items: Iterable[ClipArt], ad_split: Mapping[str, str]) -> pd.DataFrame:
    rows = [
        {
            "ad_id": i.ad_id,
            "title": i.title,
            "image_path": image_path_for(i.ad_id),
            "split": ad_split[i.ad_id],
            "category": i.category,
        }
        for i in sorted(items, key=lambda i: i.ad_id)
    ]
    return pd.DataFrame(rows, columns=["ad_id", "title", "image_path", "split", "category"])


def find_tag_pairs(ad_tags: Mapping[str, frozenset[str]], min_ads: int) -> list[tuple[str, str]]:
    """Sorted tag pairs that occur together on at least `min_ads` ads."""
    counts = Counter(
        pair for tags in ad_tags.values() for pair in itertools.combinations(sorted(tags), 2)
    )
    return sorted(pair for pair, count in counts.items() if count >= min_ads)


def build_queries(
    ad_tags: Mapping[str, frozenset[str]],
    ad_split: Mapping[str, str],
    vocabulary: Sequence[str],
    pair_min_ads: int,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Queries (each vocabulary tag, each frequent pair) and their positive qrels per split.

    An ad is relevant (1) when its tag set contains every query tag; a query exists in a
    split when it has a relevant ad there. A pair whose text ("a b", tags sorted) equals
    another query's text is dropped, so a text means one thing; query_id = q:<split>:<text>.
    """
    candidates = [(tag,) for tag in vocabulary] + find_tag_pairs(ad_tags, pair_min_ads)
    texts = Counter(" ".join(tags) for tags in candidates)
    colliding = [tags for tags in candidates if len(tags) > 1 and texts[" ".join(tags)] > 1]
    candidates = [tags for tags in candidates if tags not in colliding]
    ads_with_tag: dict[str, set[str]] = defaultdict(set)
    for ad_id, tags in ad_tags.items():
        for tag in tags:
            ads_with_tag[tag].add(ad_id)
    query_rows, qrel_rows = [], []
    for tags in candidates:
        text = " ".join(tags)
        relevant = set.intersection(*(ads_with_tag[t] for t in tags))
        by_split: dict[str, list[str]] = defaultdict(list)
        for ad_id in relevant:
            by_split[ad_split[ad_id]].append(ad_id)
        for split, ad_ids in sorted(by_split.items()):
            query_id = f"q:{split}:{text}"
            query_rows.append({"query_id": query_id, "text": text, "split": split})
            qrel_rows += [
                {"query_id": query_id, "ad_id": a, "relevance": 1, "split": split}
                for a in sorted(ad_ids)
            ]
    queries = pd.DataFrame(query_rows, columns=["query_id", "text", "split"])
    qrels = pd.DataFrame(qrel_rows, columns=["query_id", "ad_id", "relevance", "split"]).astype(
        {"relevance": "int64"}
    )
    stats = {
        "single_tag_queries": sum(len(t) == 1 for t in candidates),
        "pair_queries": sum(len(t) == 2 for t in candidates),
        "pair_queries_dropped_text_collision": len(colliding),
    }
    return queries.sort_values(["split", "text"], ignore_index=True), qrels, stats


# ---------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------


def build_openclipart(cfg: DataConfig, out_dir: Path) -> tuple[Dataset, dict]:
    """Build the openclipart benchmark into `out_dir` (images written; tables returned).

    Returns the dataset and flat build statistics (counts per protocol step, seconds per
    phase) that `build_dataset` writes into README.txt.
    """
    out_dir = Path(out_dir)
    workers = cfg.workers or os.cpu_count() or 1
    stats: dict[str, object] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats[f"seconds_{phase}"] = round(now - clock, 2)
        clock = now

    files, scan_stats = find_svg_files(cfg.svg_root)
    if not files:
        raise FileNotFoundError(f"no .svg files under {cfg.svg_root}: {INSTALL_HINT}")
    stats.update(scan_stats)
    lap("scan")

    items, parse_stats = read_clipart(files, workers)
    stats.update(parse_stats)
    lap("parse")

    kept = cap_title_groups(items, cfg.title_group_cap)
    stats.update(
        ads_before_cap=len(items),
        title_groups=len({i.title_group for i in items}),
        ads_after_cap=len(kept),
    )
    lap("cap")

    needed = len(kept) if cfg.max_ads is None else min(cfg.max_ads, len(kept))
    selected, pngs, raster_stats = rasterise_selection(
        rank_for_selection(kept, cfg.seed), needed, cfg, workers
    )
    stats.update(raster_stats)
    stats["renderer"] = renderer_version()
    stats["ads_after_max_ads"] = len(selected)
    lap("raster")

    copy_images(pngs, out_dir)
    lap("copy")

    ad_tags, vocabulary, tag_stats = tag_items(selected, cfg)
    stats.update(tag_stats)
    ad_split = split_by_title_group(selected, cfg.split_fractions, cfg.seed)
    ads = build_ads_table(selected, ad_split)
    queries, qrels, query_stats = build_queries(ad_tags, ad_split, vocabulary, cfg.pair_min_ads)
    stats.update(query_stats)
    lap("tags_queries")

    log.info(
        "openclipart: %d real files, %d after title cap, %d ads, %d tags, %d queries (%d single, %d pair)",
        stats["real_files"],
        len(kept),
        len(ads),
        len(vocabulary),
        len(queries),
        stats["single_tag_queries"],
        stats["pair_queries"],
    )
    dataset = Dataset(
        ads=ads, queries=queries, qrels=qrels, root=out_dir, extra={"source": "openclipart"}
    )
    return dataset, stats
