"""The `synthetic` source: small shop-like ads with a planted part-word mapping.

Each ad image is a few visual parts (object kinds with a distinctive shape, colour
and pattern) on a light background; its title names only some of them among filler
shop words. Kinds co-occur by shop theme, so the vision and language co-occurrence
graphs share structure. The planted truth (which kind is where, which word names it,
whether the title says so) is written to `synthetic_truth.json` for model tests.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from components.data.config import DataConfig
from components.data.format import IMAGES_DIR, SPLITS, Dataset
from components.data.splits import assign_splits
from components.data.truth import TRUTH_FILE, load_synthetic_truth  # noqa: F401 (re-export)

log = logging.getLogger(__name__)


# Rendering is supersampled then downscaled, which antialiases the edges.
_SUPERSAMPLE = 2
_PLACEMENT_TRIES = 60
_GAP_PX = 3


@dataclass(frozen=True)
class PartKind:
    """One object kind: what it looks like and the word that names it."""

    kind: str  # the visual identity (shape), never shown to a model
    word: str  # the name a title would use
    colour_name: str
    rgb: tuple[int, int, int]
    pattern: str  # solid | stripes | dots | checks
    accent: tuple[int, int, int]  # colour of the pattern (and of nothing when solid)
    stripe_angle: int = 45  # degrees, for stripes


PART_KINDS: tuple[PartKind, ...] = (
    PartKind("circle", "ball", "red", (214, 40, 40), "stripes", (250, 250, 250), 0),
    PartKind("lidded_square", "box", "brown", (160, 98, 52), "checks", (112, 64, 30)),
    PartKind("five_point_star", "star", "gold", (242, 186, 12), "solid", (242, 186, 12)),
    PartKind("heart", "heart", "pink", (240, 98, 170), "dots", (255, 228, 240)),
    PartKind("annulus", "ring", "purple", (128, 64, 196), "solid", (128, 64, 196)),
    PartKind("vesica", "leaf", "green", (62, 168, 64), "stripes", (170, 230, 150), 45),
    PartKind("mug", "cup", "blue", (40, 100, 214), "dots", (235, 242, 255)),
    PartKind("pennant", "flag", "orange", (250, 128, 20), "checks", (255, 245, 230)),
    PartKind("crescent", "moon", "navy", (30, 42, 110), "solid", (30, 42, 110)),
    PartKind("zigzag", "bolt", "yellow", (252, 220, 0), "stripes", (30, 30, 30), -45),
    PartKind("teardrop", "drop", "teal", (20, 176, 196), "solid", (20, 176, 196)),
    PartKind("key_outline", "key", "grey", (118, 118, 124), "solid", (118, 118, 124)),
    PartKind("fir", "tree", "dark green", (24, 100, 58), "dots", (226, 40, 40)),
    PartKind("bell_shape", "bell", "magenta", (196, 26, 124), "checks", (255, 220, 240)),
)
PART_WORDS: dict[str, str] = {k.kind: k.word for k in PART_KINDS}
_KIND_BY_WORD: dict[str, PartKind] = {k.word: k for k in PART_KINDS}

# Shop themes: each favours some kinds (listed most likely first); themes overlap.
THEMES: dict[str, tuple[str, ...]] = {
    "toys": ("ball", "star", "bolt", "flag", "box"),
    "kitchen": ("cup", "drop", "box", "leaf", "bell"),
    "garden": ("leaf", "tree", "drop", "flag", "moon"),
    "gifts": ("heart", "ring", "star", "bell", "key"),
    "home": ("key", "moon", "cup", "ring", "bolt"),
}
_THEME_WEIGHTS = (1.0, 0.85, 0.7, 0.55, 0.45)
_OFF_THEME_PROB = 0.12

BRAND_WORDS: tuple[str, ...] = ("acme", "zenko", "novalux", "orbi", "lumora", "kivo", "pixa", "tandem")
SHOP_WORDS: tuple[str, ...] = (
    "sale", "new", "deal", "set", "premium", "bundle", "offer", "classic", "mini", "pack",
    "value", "shop", "best", "discount",
)  # fmt: skip
CONNECTOR_WORDS: tuple[str, ...] = ("and", "with", "plus")
FILLER_WORDS: frozenset[str] = frozenset(BRAND_WORDS + SHOP_WORDS + CONNECTOR_WORDS + tuple(THEMES))


def _check_vocabulary() -> None:
    collisions = FILLER_WORDS & set(PART_WORDS.values())
    if collisions:
        raise ValueError(f"synthetic filler words collide with part words: {sorted(collisions)}")
    if len(set(PART_WORDS.values())) != len(PART_WORDS):
        raise ValueError("synthetic part words must be distinct")
    unknown = {w for kinds in THEMES.values() for w in kinds} - set(_KIND_BY_WORD)
    if unknown:
        raise ValueError(f"synthetic themes use unknown part words: {sorted(unknown)}")


# --- shapes: each draws a white (255) silhouette on an L-mode mask of side s ----------


def _pts(s: float, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * s, y * s) for x, y in points]


def _box(s: float, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0 * s, y0 * s, x1 * s, y1 * s]


def _draw_circle(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.05, 0.05, 0.95, 0.95), fill=255)


def _draw_lidded_square(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rectangle(_box(s, 0.12, 0.28, 0.88, 0.94), fill=255)
    d.rectangle(_box(s, 0.05, 0.08, 0.95, 0.3), fill=255)


def _draw_five_point_star(d: ImageDraw.ImageDraw, s: float) -> None:
    points = []
    for i in range(10):
        r = 0.48 if i % 2 == 0 else 0.2
        a = -math.pi / 2 + i * math.pi / 5
        points.append((0.5 + r * math.cos(a), 0.53 + r * math.sin(a)))
    d.polygon(_pts(s, points), fill=255)


def _draw_heart(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.06, 0.1, 0.52, 0.56), fill=255)
    d.ellipse(_box(s, 0.48, 0.1, 0.94, 0.56), fill=255)
    d.polygon(_pts(s, [(0.07, 0.42), (0.93, 0.42), (0.5, 0.93)]), fill=255)


def _draw_annulus(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.05, 0.05, 0.95, 0.95), fill=255)
    d.ellipse(_box(s, 0.29, 0.29, 0.71, 0.71), fill=0)


def _draw_vesica(d: ImageDraw.ImageDraw, s: float) -> None:
    # A pointed leaf along the diagonal, with a short stem.
    ax, ay, bx, by = 0.14, 0.86, 0.94, 0.06
    length = math.hypot(bx - ax, by - ay)
    nx, ny = -(by - ay) / length, (bx - ax) / length
    upper, lower = [], []
    for i in range(25):
        t = i / 24
        w = 0.22 * math.sin(math.pi * t)
        cx, cy = ax + t * (bx - ax), ay + t * (by - ay)
        upper.append((cx + w * nx, cy + w * ny))
        lower.append((cx - w * nx, cy - w * ny))
    d.polygon(_pts(s, upper + lower[::-1]), fill=255)
    d.line(_pts(s, [(0.02, 0.98), (0.2, 0.8)]), fill=255, width=max(2, int(0.05 * s)))


def _draw_mug(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.56, 0.3, 0.95, 0.7), outline=255, width=max(2, int(0.08 * s)))
    d.polygon(_pts(s, [(0.06, 0.14), (0.72, 0.14), (0.64, 0.92), (0.14, 0.92)]), fill=255)


def _draw_pennant(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rectangle(_box(s, 0.06, 0.04, 0.13, 0.97), fill=255)
    top = [(0.13 + 0.8 * i / 12, 0.08 + 0.05 * math.sin(2 * math.pi * i / 12)) for i in range(13)]
    bottom = [(x, y + 0.5) for x, y in top]
    d.polygon(_pts(s, top + bottom[::-1]), fill=255)


def _draw_crescent(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.05, 0.05, 0.95, 0.95), fill=255)
    d.ellipse(_box(s, 0.32, -0.04, 1.12, 0.76), fill=0)


def _draw_zigzag(d: ImageDraw.ImageDraw, s: float) -> None:
    points = [(0.56, 0.02), (0.16, 0.56), (0.46, 0.56), (0.34, 0.98), (0.84, 0.4), (0.55, 0.4), (0.72, 0.02)]
    d.polygon(_pts(s, points), fill=255)


def _draw_teardrop(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.2, 0.36, 0.8, 0.96), fill=255)
    d.polygon(_pts(s, [(0.5, 0.03), (0.215, 0.6), (0.785, 0.6)]), fill=255)


def _draw_key_outline(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rectangle(_box(s, 0.36, 0.44, 0.97, 0.56), fill=255)
    d.rectangle(_box(s, 0.78, 0.56, 0.86, 0.74), fill=255)
    d.rectangle(_box(s, 0.89, 0.56, 0.97, 0.68), fill=255)
    d.ellipse(_box(s, 0.03, 0.28, 0.45, 0.72), fill=255)
    d.ellipse(_box(s, 0.15, 0.4, 0.31, 0.6), fill=0)


def _draw_fir(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rectangle(_box(s, 0.42, 0.78, 0.58, 0.98), fill=255)
    d.polygon(_pts(s, [(0.5, 0.02), (0.22, 0.38), (0.78, 0.38)]), fill=255)
    d.polygon(_pts(s, [(0.5, 0.18), (0.13, 0.6), (0.87, 0.6)]), fill=255)
    d.polygon(_pts(s, [(0.5, 0.36), (0.05, 0.82), (0.95, 0.82)]), fill=255)


def _draw_bell_shape(d: ImageDraw.ImageDraw, s: float) -> None:
    d.ellipse(_box(s, 0.42, 0.02, 0.58, 0.14), fill=255)
    d.ellipse(_box(s, 0.24, 0.1, 0.76, 0.56), fill=255)
    d.polygon(_pts(s, [(0.24, 0.33), (0.76, 0.33), (0.8, 0.68), (0.94, 0.82), (0.06, 0.82), (0.2, 0.68)]), fill=255)
    d.ellipse(_box(s, 0.41, 0.78, 0.59, 0.96), fill=255)


_SHAPES = {
    "circle": _draw_circle,
    "lidded_square": _draw_lidded_square,
    "five_point_star": _draw_five_point_star,
    "heart": _draw_heart,
    "annulus": _draw_annulus,
    "vesica": _draw_vesica,
    "mug": _draw_mug,
    "pennant": _draw_pennant,
    "crescent": _draw_crescent,
    "zigzag": _draw_zigzag,
    "teardrop": _draw_teardrop,
    "key_outline": _draw_key_outline,
    "fir": _draw_fir,
    "bell_shape": _draw_bell_shape,
}


# --- rendering -----------------------------------------------------------------------


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


def _pattern(kind: PartKind, size: int, base: tuple, accent: tuple, rng: np.random.Generator) -> Image.Image:
    tile = Image.new("RGB", (size, size), base)
    if kind.pattern == "solid":
        return tile
    d = ImageDraw.Draw(tile)
    period = max(6, size // 6)
    phase = int(rng.integers(0, period))
    if kind.pattern == "stripes":
        width = max(2, period // 2)
        if kind.stripe_angle == 0:
            for y in range(-period + phase, size + period, period):
                d.rectangle([0, y, size, y + width - 1], fill=accent)
        else:
            sign = 1 if kind.stripe_angle > 0 else -1
            for k in range(-size + phase, 2 * size, period):
                start = (k, 0) if sign > 0 else (k - size, 0)
                end = (k - size, size) if sign > 0 else (k, size)
                d.line([start, end], fill=accent, width=width)
    elif kind.pattern == "dots":
        r = max(2, int(period * 0.24))
        for row, y in enumerate(range(phase - period, size + period, period)):
            shift = period // 2 if row % 2 else 0
            for x in range(phase - period + shift, size + period, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif kind.pattern == "checks":
        for i, y in enumerate(range(phase - period, size + period, period)):
            for j, x in enumerate(range(phase - period, size + period, period)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=accent)
    else:  # pragma: no cover - the table above is fixed
        raise ValueError(f"unknown pattern {kind.pattern!r}")
    return tile


def _render_part(kind: PartKind, side: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """An RGBA tile of one part, cropped to its silhouette, plus what was drawn."""
    big = side * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _SHAPES[kind.kind](ImageDraw.Draw(mask), float(big))
    base = _jitter_rgb(kind.rgb, rng, 16)
    accent = base if kind.pattern == "solid" else _jitter_rgb(kind.accent, rng, 10)
    rgb = _pattern(kind, big, base, accent, rng)
    # A darker outline, as clip art has: the mask minus its (blur-thresholded) interior.
    inner = mask.filter(ImageFilter.BoxBlur(2 * _SUPERSAMPLE)).point(lambda v: 255 if v >= 250 else 0)
    rgb.paste(tuple(int(v * 0.55) for v in base), mask=ImageChops.subtract(mask, inner))
    tile = rgb.convert("RGBA")
    tile.putalpha(mask)
    tile = tile.reduce(_SUPERSAMPLE)  # box-averaged downscale: antialiased edges
    angle = float(rng.uniform(-22.0, 22.0))
    tile = tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    bbox = tile.getchannel("A").point(lambda a: 255 if a > 24 else 0).getbbox()
    if bbox is not None:
        tile = tile.crop(bbox)
    drawn = {"colour": "#{:02x}{:02x}{:02x}".format(*base), "rotation": round(angle, 2)}
    return tile, drawn


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in placed:
        if x0 < a1 + _GAP_PX and a0 < x1 + _GAP_PX and y0 < b1 + _GAP_PX and b0 < y1 + _GAP_PX:
            return True
    return False


def _place(tile: Image.Image, size: int, placed: list, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """A random position where `tile` overlaps no placed box; shrinks the tile if none is found."""
    while True:
        w, h = tile.size
        if w < size and h < size:
            for _ in range(_PLACEMENT_TRIES):
                x0 = int(rng.integers(1, size - w))
                y0 = int(rng.integers(1, size - h))
                box = (x0, y0, x0 + w, y0 + h)
                if not _overlaps(box, placed):
                    return tile, box
        if min(w, h) <= 8:
            raise RuntimeError(
                f"cannot place {len(placed) + 1} non-overlapping parts on a {size}px image; "
                "lower data.synthetic.parts_per_ad_max or raise data.synthetic.image_size"
            )
        tile = tile.resize((max(1, int(w * 0.85)), max(1, int(h * 0.85))), Image.Resampling.LANCZOS)


def _render_ad(kinds: list[PartKind], size: int, rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    tint = rng.integers(232, 252, size=3)
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in tint))
    max_frac = min(0.6, 0.75 / math.sqrt(len(kinds)))
    placed: list[tuple[int, int, int, int]] = []
    parts = []
    for kind in kinds:
        side = max(12, int(size * max_frac * rng.uniform(0.72, 1.0)))
        tile, drawn = _render_part(kind, side, rng)
        tile, box = _place(tile, size, placed, rng)
        canvas.paste(tile, box[:2], mask=tile.getchannel("A"))
        placed.append(box)
        parts.append({"kind": kind.kind, "word": kind.word, "bbox": list(box), "colour": drawn["colour"],
                      "colour_name": kind.colour_name, "pattern": kind.pattern, "rotation": drawn["rotation"]})  # fmt: skip
    return canvas, parts


# --- ads, titles, queries ------------------------------------------------------------


def _choose_parts(theme: str, num_parts: int, rng: np.random.Generator) -> list[PartKind]:
    favoured = THEMES[theme]
    weights = np.asarray(_THEME_WEIGHTS[: len(favoured)], dtype=float)
    chosen: list[str] = []
    while len(chosen) < num_parts:
        if rng.random() < _OFF_THEME_PROB:
            pool = [k.word for k in PART_KINDS if k.word not in chosen]
            word = pool[int(rng.integers(len(pool)))]
        else:
            free = [i for i, w in enumerate(favoured) if w not in chosen]
            if not free:
                pool = [k.word for k in PART_KINDS if k.word not in chosen]
                word = pool[int(rng.integers(len(pool)))]
            else:
                p = weights[free] / weights[free].sum()
                word = favoured[free[int(rng.choice(len(free), p=p))]]
        chosen.append(word)
    return [_KIND_BY_WORD[w] for w in chosen]


def _compose_title(named: list[str], theme: str, rng: np.random.Generator) -> str:
    brand = BRAND_WORDS[int(rng.integers(len(BRAND_WORDS)))]
    shop = [SHOP_WORDS[i] for i in rng.choice(len(SHOP_WORDS), size=2, replace=False)]
    if len(named) >= 2:
        connector = CONNECTOR_WORDS[int(rng.integers(len(CONNECTOR_WORDS)))]
        words = f" {connector} ".join(named) if rng.random() < 0.6 else " ".join(named)
    else:
        words = " ".join(named)
    templates = (
        [brand, words, shop[0]],
        [shop[0], brand, words],
        [brand, theme, words, shop[0]],
        [words, shop[0], shop[1]],
        [brand, words, shop[0], shop[1]],
    )
    tokens = templates[int(rng.integers(len(templates)))]
    return " ".join(t for t in tokens if t)


def _queries_and_qrels(ads: pd.DataFrame, ad_words: dict[str, set[str]], pair_min_ads: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    pair_counts: Counter = Counter()
    for words in ad_words.values():
        pair_counts.update(combinations(sorted(words), 2))
    query_terms = [(w,) for w in sorted(_KIND_BY_WORD)]
    query_terms += [pair for pair, n in sorted(pair_counts.items()) if n >= pair_min_ads]
    queries, qrels = [], []
    for split in SPLITS:
        split_ads = ads.loc[ads["split"] == split, "ad_id"].tolist()
        for terms in query_terms:
            relevant = [a for a in split_ads if set(terms) <= ad_words[a]]
            if not relevant:
                continue
            text = " ".join(terms)
            query_id = f"q:{split}:{text}"
            queries.append({"query_id": query_id, "text": text, "split": split})
            qrels += [{"query_id": query_id, "ad_id": a, "relevance": 1, "split": split} for a in relevant]
    return (
        pd.DataFrame(queries, columns=["query_id", "text", "split"]),
        pd.DataFrame(qrels, columns=["query_id", "ad_id", "relevance", "split"]),
    )


def build_synthetic(cfg: DataConfig, out_dir: Path) -> tuple[Dataset, dict]:
    """Generate `cfg.synthetic.num_ads` ads into `out_dir` (images and the planted truth).

    Deterministic in `cfg.seed`: the same config gives identical tables and image bytes.
    """
    _check_vocabulary()
    syn = cfg.synthetic
    if syn.parts_per_ad_max < syn.parts_per_ad_min:
        raise ValueError("data.synthetic.parts_per_ad_max must be >= parts_per_ad_min")
    if syn.title_words_max < syn.title_words_min:
        raise ValueError("data.synthetic.title_words_max must be >= title_words_min")
    if syn.parts_per_ad_max > len(PART_KINDS):
        raise ValueError(f"data.synthetic.parts_per_ad_max is at most {len(PART_KINDS)} (the number of part kinds)")
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    theme_names = list(THEMES)

    rows, truth_ads, ad_words = [], {}, {}
    for i in range(syn.num_ads):
        ad_id = f"syn:{i:05d}"
        theme = theme_names[int(rng.integers(len(theme_names)))]
        num_parts = int(rng.integers(syn.parts_per_ad_min, syn.parts_per_ad_max + 1))
        kinds = _choose_parts(theme, num_parts, rng)
        # Titles name some parts, never all of a multi-part ad: the rest only the image shows.
        max_named = num_parts - 1 if num_parts > 1 else num_parts
        num_named = min(int(rng.integers(syn.title_words_min, syn.title_words_max + 1)), max_named)
        named_idx = sorted(int(j) for j in rng.choice(num_parts, size=num_named, replace=False))
        named = [kinds[j].word for j in named_idx]
        title = _compose_title(named, theme, rng)
        image, parts = _render_ad(kinds, syn.image_size, rng)
        image_path = f"{IMAGES_DIR}/syn_{i:05d}.png"
        image.save(out_dir / image_path, format="PNG", compress_level=1)
        for j, part in enumerate(parts):
            part["named_in_title"] = j in named_idx
        rows.append({"ad_id": ad_id, "title": title, "image_path": image_path, "category": theme})
        truth_ads[ad_id] = {"title": title, "theme": theme, "image_path": image_path, "parts": parts}
        ad_words[ad_id] = {k.word for k in kinds}

    ads = pd.DataFrame(rows)
    split_of = assign_splits(ads["ad_id"], cfg.split_fractions, cfg.seed)
    ads.insert(3, "split", ads["ad_id"].map(split_of))
    for ad_id, split in split_of.items():
        truth_ads[ad_id]["split"] = split
    queries, qrels = _queries_and_qrels(ads, ad_words, cfg.pair_min_ads)

    truth = {
        "seed": cfg.seed,
        "image_size": syn.image_size,
        "bbox_convention": "x0,y0,x1,y1 in pixels; x1,y1 exclusive",
        "vocabulary": dict(PART_WORDS),
        "kinds": {k.kind: {"word": k.word, "colour_name": k.colour_name, "pattern": k.pattern} for k in PART_KINDS},
        "themes": {name: list(words) for name, words in THEMES.items()},
        "filler_words": sorted(FILLER_WORDS),
        "ads": truth_ads,
    }
    (out_dir / TRUTH_FILE).write_text(json.dumps(truth, indent=1, sort_keys=True))

    stats = _stats(ads, queries, qrels, truth_ads)
    log.info("synthetic: %s", stats)
    return Dataset(ads=ads, queries=queries, qrels=qrels, root=out_dir), stats


def _stats(ads: pd.DataFrame, queries: pd.DataFrame, qrels: pd.DataFrame, truth_ads: dict) -> dict:
    titles = dict(zip(ads["ad_id"], ads["title"].str.split().map(set), strict=True))
    texts = dict(zip(queries["query_id"], queries["text"].str.split(), strict=True))
    image_only = sum(not (set(texts[q]) & titles[a]) for q, a in zip(qrels["query_id"], qrels["ad_id"], strict=True))
    parts = [p for ad in truth_ads.values() for p in ad["parts"]]
    is_pair = queries["text"].str.contains(" ")
    return {
        "num_ads": int(len(ads)),
        "num_part_kinds": len(PART_KINDS),
        "num_themes": len(THEMES),
        "parts_per_ad_mean": round(len(parts) / max(1, len(ads)), 3),
        "named_part_share": round(sum(p["named_in_title"] for p in parts) / max(1, len(parts)), 3),
        "num_word_queries": int((~is_pair).sum()),
        "num_pair_queries": int(is_pair.sum()),
        "positive_qrels": int(len(qrels)),
        "image_only_share": round(image_only / max(1, len(qrels)), 3),
    }
