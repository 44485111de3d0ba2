"""How good the alignment is, measured directly (docs/method.md#how-the-words-are-scored).

- `alignment_precision_at_1`: on the synthetic set, whether each visual concept's top word
  names the planted part kind its regions cover (the truth is used only here, never in
  training).
- `visual_word_precision`: on real data, the share of an ad's visual words found among its
  held-out words (e.g. the texts of its positive test queries).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from components.align.model import AlignmentModel
from components.text.stems import word_stem
from components.text.vocabulary import tokenize
from components.vision.parts import PartsFeatures


def region_kinds(boxes: np.ndarray, mask: np.ndarray, truth_parts: list[dict],
                 min_coverage: float = 0.5) -> list[str | None]:
    """The planted word of each region: the truth part whose box covers the largest share of
    the region, if that share is at least `min_coverage`; None for background or mixed."""
    out: list[str | None] = []
    for box, valid in zip(boxes, mask, strict=True):
        if not valid:
            out.append(None)
            continue
        area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)
        best, best_share = None, 0.0
        for part in truth_parts:
            x0, y0, x1, y1 = part["bbox"]
            iw = max(0.0, min(box[2], x1) - max(box[0], x0))
            ih = max(0.0, min(box[3], y1) - max(box[1], y0))
            share = iw * ih / area
            if share > best_share:
                best, best_share = part["word"], share
        out.append(best if best_share >= min_coverage else None)
    return out


def concept_kinds(concepts: np.ndarray, kinds: list[list[str | None]], min_regions: int = 3,
                  min_share: float = 0.5) -> dict[int, str]:
    """Concept -> majority planted word over its regions (background counts as a label of its
    own), for concepts with >= `min_regions` regions whose majority word has >= `min_share`."""
    counts: dict[int, Counter] = {}
    for row_c, row_k in zip(concepts, kinds, strict=True):
        for c, kind in zip(row_c, row_k, strict=True):
            if c >= 0:
                counts.setdefault(int(c), Counter())[kind] += 1
    out = {}
    for c, counter in counts.items():
        total = sum(counter.values())
        kind, n = counter.most_common(1)[0]
        if kind is not None and total >= min_regions and n / total >= min_share:
            out[c] = kind
    return out


def alignment_precision_at_1(model: AlignmentModel, parts: PartsFeatures, truth: dict,
                             ad_ids: Sequence[str], *, min_coverage: float = 0.5,
                             min_regions: int = 3, min_share: float = 0.5,
                             concept_words: Sequence[str] | None = None) -> dict[str, float]:
    """Label-free alignment quality on a synthetic dataset with planted parts.

    `parts[i]` belongs to `ad_ids[i]`; `truth` is `load_synthetic_truth(root)`.
    `concept_words` (optional, one word per concept) replaces the model's concept words, for
    controls such as a shuffled assignment.
    Returns `precision@1` (concepts whose top word names their majority kind),
    `num_concepts_scored`, `translate_precision@1` (images whose top translated word names
    a part present in the image), `translate_recall` (share of an image's planted parts
    named among its translated words) and `translate_precision@m`.
    """
    if len(ad_ids) != len(parts):
        raise ValueError("one ad id per row of parts")
    concepts = model.assign_concepts(parts)
    kinds = [region_kinds(parts.boxes[i], parts.mask[i], truth["ads"][a]["parts"], min_coverage)
             for i, a in enumerate(ad_ids)]
    majority = concept_kinds(concepts, kinds, min_regions, min_share)
    if concept_words is None:
        concept_words = [ws[0][0] for ws in model.concept_words(top=1)]
    hits = [concept_words[c] == kind for c, kind in majority.items()]

    translated = model.translate(parts)
    top1, recall, precision_m = [], [], []
    for a, words in zip(ad_ids, translated, strict=True):
        present = {p["word"] for p in truth["ads"][a]["parts"]}
        names = [w.word for w in words]
        top1.append(bool(names) and names[0] in present)
        recall.append(len(present & set(names)) / max(1, len(present)))
        precision_m.append(sum(w in present for w in names) / max(1, len(names)))
    return {
        "precision@1": float(np.mean(hits)) if hits else 0.0,
        "num_concepts_scored": len(hits),
        "num_concepts": int(len(model.centroids)),
        "translate_precision@1": float(np.mean(top1)),
        "translate_recall": float(np.mean(recall)),
        "translate_precision@m": float(np.mean(precision_m)),
    }


def held_out_words(texts: Sequence[str]) -> set[str]:
    """The stems of all tokens of some held-out texts (e.g. an ad's positive query texts)."""
    return {word_stem(t) for text in texts for t in tokenize(text)}


def visual_word_precision(words_per_ad: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
                          held_out_words_per_ad: Mapping[str, Sequence[str] | set[str]] | Sequence,
                          k: int = 8) -> dict[str, float]:
    """Precision of each ad's visual words against its held-out words (docs/method.md#how-the-words-are-scored).

    Both arguments are keyed alike (dicts by ad id, or parallel lists); held-out entries are
    words or texts (tokenised, stemmed). Only ads with held-out words count. Words are
    compared by stem (plural-insensitive). Returns `precision@k` (hits in the first k words
    over k), `precision` (hits over the words actually given), `hit_rate` (ads with at least
    one hit), `mean_words` and `num_ads`.
    """
    if isinstance(words_per_ad, Mapping):
        keys = [a for a in words_per_ad if a in held_out_words_per_ad]
        pairs = [(words_per_ad[a], held_out_words_per_ad[a]) for a in keys]
    else:
        pairs = list(zip(words_per_ad, held_out_words_per_ad, strict=True))
    p_at_k, precision, hit, lengths = [], [], [], []
    for words, held in pairs:
        held_stems = held_out_words(list(held))
        if not held_stems:
            continue
        words = [w[0] if isinstance(w, tuple) else w for w in words][:k]
        hits = sum(word_stem(w) in held_stems for w in words)
        p_at_k.append(hits / k)
        precision.append(hits / len(words) if words else 0.0)
        hit.append(hits > 0)
        lengths.append(len(words))
    n = len(p_at_k)
    return {
        f"precision@{k}": float(np.mean(p_at_k)) if n else 0.0,
        "precision": float(np.mean(precision)) if n else 0.0,
        "hit_rate": float(np.mean(hit)) if n else 0.0,
        "mean_words": float(np.mean(lengths)) if n else 0.0,
        "num_ads": n,
    }


def word_precision_report(words_per_ad: Mapping[str, Sequence[str]], held_out_per_ad: Mapping[str, Sequence[str]],
                          titles: Mapping[str, str], vocabulary: Sequence[str], k: int = 8,
                          shown: int = 3) -> dict[str, float]:
    """Word precision a person can judge (issue: words that carry the image).

    - `precision`: hits over the words given, per ad, averaged over ads with held-out words
      (an ad given no word counts 0); `precision@k` divides by k instead;
    - `precision_not_in_title`: the same over the words that are not already in the ad's
      title (what the words add), over ads that got such words;
    - `constant_precision`: the same measure for a constant list, the `len` most frequent
      vocabulary words (`vocabulary` is ordered by frequency), `len` = the mean number of
      words given (at least 1); `lift` = precision / constant_precision;
    - `coverage`: share of those ads given at least one word; `mean_words`;
    - `ceiling`: what an oracle reaches giving each ad as many words, all from `vocabulary`:
      min(held-out vocabulary words, words given) / words given. An ad's held-out text is
      short (openclipart test ads: 1.7 tag stems on average), so precision over 8 words
      cannot pass ~0.2 whatever the alignment;
    - `shown_precision`, `shown_constant_precision`, `shown_lift`, `shown_ceiling`: the same
      for each list's first `shown` words (`words_shown`: what a person sees, AlignConfig).
    """
    base = visual_word_precision(words_per_ad, held_out_per_ad, k)
    shown = max(1, min(shown, k))
    first = visual_word_precision(words_per_ad, held_out_per_ad, shown)
    vocabulary_stems = {word_stem(w) for w in vocabulary}
    held_stems = {a: held_out_words(list(held)) for a, held in held_out_per_ad.items()}
    reachable = {a: len(stems & vocabulary_stems) for a, stems in held_stems.items() if stems}
    given_count = {a: len(words_per_ad.get(a, [])[:k]) for a in reachable}
    ceiling = [min(n, given_count[a]) / given_count[a] if given_count[a] else 0.0 for a, n in reachable.items()]
    ceiling_shown = [min(n, shown) / shown for n in reachable.values()]
    not_in_title = []
    for ad_id, held in held_out_per_ad.items():
        title_stems = {word_stem(t) for t in tokenize(titles.get(ad_id, ""))}
        new = [w for w in words_per_ad.get(ad_id, []) if word_stem(w) not in title_stems]
        if new:
            held_stems = held_out_words(list(held))
            not_in_title.append(sum(word_stem(w) in held_stems for w in new) / len(new))
    size = max(1, int(round(base["mean_words"])))
    constant = visual_word_precision({a: list(vocabulary[:size]) for a in held_out_per_ad}, held_out_per_ad, k)
    constant_shown = visual_word_precision({a: list(vocabulary[:shown]) for a in held_out_per_ad}, held_out_per_ad,
                                           shown)[f"precision@{shown}"]
    shown_precision = first[f"precision@{shown}"]
    given = [len(words_per_ad.get(a, [])) > 0 for a in held_out_per_ad]
    return {
        "precision": base["precision"], f"precision@{k}": base[f"precision@{k}"],
        "precision_not_in_title": float(np.mean(not_in_title)) if not_in_title else 0.0,
        "constant_precision": constant["precision"],
        "lift": base["precision"] / constant["precision"] if constant["precision"] > 0 else float("inf"),
        "coverage": float(np.mean(given)) if given else 0.0, "mean_words": base["mean_words"],
        "ceiling": float(np.mean(ceiling)) if ceiling else 0.0,
        "words_shown": shown, "shown_precision": shown_precision, "shown_constant_precision": constant_shown,
        "shown_lift": shown_precision / constant_shown if constant_shown > 0 else float("inf"),
        "shown_ceiling": float(np.mean(ceiling_shown)) if ceiling_shown else 0.0,
        "num_ads": base["num_ads"],
    }
