"""New ads through a registered model version, the same way its bundle encoded its own ads.

No model code lives here: each step is the public function the training/registration path
uses, so this follows whatever the model does.

    images --extract_parts_cached--> parts --translate_ads (the version's alignment)--> visual
    words + per-word logits --match_data--> AdSide --TwoTowerScorer.encode_ads--> embeddings

and, for the search page, once here rather than per request: each image's content hash
(`image_hash`: identical images are one result) and, for each of the words a person is shown
(the alignment's `words_shown`), the part of the image it came from (`word_boxes_of`).

(`components.search.engine.SearchEngine.score_split` and `components.search.bundle.build_bundle`
chain the same calls.)
Big batches go through in chunks so memory stays flat, with a progress bar and a measured
ads/s; the vision step uses a GPU when one exists (`extract_parts` picks CUDA) and parallel
decode threads otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from components.data.format import Dataset
from components.match.data import QuerySide, match_data
from components.search.catalogue import image_hash, word_boxes_of
from components.search.engine import ad_features

log = logging.getLogger(__name__)

CHUNK = 512  # ads per chunk: parts, words and embeddings of one chunk are in memory at once


@dataclass
class EncodedAds:
    ad_ids: list[str]
    titles: list[str]
    words: list[list[tuple[str, float]]]  # visual words per ad, best first
    embeddings: np.ndarray  # (N, dim) float32, the ad tower's vectors: what the index holds
    word_vectors: dict[str, np.ndarray]  # query-tower vector of every visual word used
    image_hashes: list[str] | None = None  # sha256 of each ad's image file
    word_boxes: list[list[list[float]]] | None = None  # per ad, per shown word: [x0, y0, x1, y1] in 0..1 or []
    words_shown: int | None = None  # how many words `word_boxes` covers (the alignment's words_shown)
    seconds: float = 0.0
    step_seconds: dict[str, float] | None = None

    @property
    def ads_per_second(self) -> float:
        return len(self.ad_ids) / self.seconds if self.seconds else 0.0


def _empty_queries() -> pd.DataFrame:
    return pd.DataFrame({"query_id": pd.Series([], dtype="string"), "text": pd.Series([], dtype="string"),
                         "split": pd.Series([], dtype="string")})


def encode_ads(engine, ads: pd.DataFrame, root: Path, *, cache_dir: Path, progress: bool = True,
               known_word_vectors: dict[str, np.ndarray] | None = None, chunk: int = CHUNK) -> EncodedAds:
    """Encode `ads` (interchange-format rows: ad_id, title, image_path relative to `root`) with
    `engine`'s model (a `components.search.engine.SearchEngine`: its alignment and ad tower).

    `known_word_vectors`: vectors already computed (the catalogue's), not encoded again.
    """
    # torch-bound (the alignment network): imported here, so a one-off search never loads torch
    from components.align.stage import translate_ads

    loading = time.perf_counter()
    needs_images = engine.scorer.net.image_head is not None  # the models load here, not in the rate
    engine.alignment  # noqa: B018
    started = time.perf_counter()
    steps = {"load": round(started - loading, 3), "parts": 0.0, "words": 0.0, "ad_tower": 0.0}
    ads = ads.reset_index(drop=True)
    ad_ids: list[str] = []
    titles: list[str] = []
    words: list[list[tuple[str, float]]] = []
    hashes: list[str] = []
    boxes: list[list[list[float]]] = []
    shown = engine.alignment.words_shown
    chunks: list[np.ndarray] = []
    with tqdm(total=len(ads), desc="encode ads", unit="ad", disable=not progress) as bar:
        for start in range(0, len(ads), chunk):
            part = Dataset(ads=ads.iloc[start:start + chunk].reset_index(drop=True), queries=_empty_queries(),
                           qrels=pd.DataFrame(columns=["query_id", "ad_id", "relevance", "split"]), root=Path(root))
            ids = part.ads["ad_id"].astype(str).tolist()
            t0 = time.perf_counter()
            features = ad_features(part, engine.vision, cache_dir)
            t1 = time.perf_counter()
            ad_words, word_logits = translate_ads(engine.alignment, ids, features)
            boxes += word_boxes_of(engine.alignment, features, [[w for w, _ in ad_words.get(a, [])[:shown]] for a in ids])
            t2 = time.perf_counter()
            data = match_data(part, words=ad_words, features=features if needs_images else None,
                              word_logits=word_logits)
            chunks.append(engine.scorer.encode_ads(data.ads))
            t3 = time.perf_counter()
            steps["parts"] += t1 - t0
            steps["words"] += t2 - t1
            steps["ad_tower"] += t3 - t2
            ad_ids += data.ads.ad_ids
            titles += data.ads.titles
            words += [ad_words.get(a, []) for a in ids]
            hashes += [image_hash(part.image_file(p)) for p in part.ads["image_path"]]
            bar.update(len(ids))
    known = known_word_vectors or {}
    missing = sorted({w for ws in words for w, _ in ws} - set(known))
    vectors = {}
    if missing:
        t0 = time.perf_counter()
        encoded = engine.scorer.encode_queries(QuerySide(missing, missing))
        vectors = dict(zip(missing, encoded, strict=True))
        steps["ad_tower"] += time.perf_counter() - t0
    dim = engine.scorer.net.dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    seconds = time.perf_counter() - started
    log.info("encoded %d ads in %.1f s (%.1f ads/s; parts %.1f s, words %.1f s, ad tower %.1f s)", len(ad_ids),
             seconds, len(ad_ids) / seconds if seconds else 0.0, steps["parts"], steps["words"], steps["ad_tower"])
    return EncodedAds(ad_ids, titles, words, embeddings.astype(np.float32), vectors, hashes, boxes, shown, seconds,
                      {k: round(v, 3) for k, v in steps.items()})
