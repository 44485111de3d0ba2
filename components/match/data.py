"""What a matcher sees: queries, ads (title, aligned visual words, image features) and qrels.

Everything here is plain data (lists and arrays), so any system can be trained and scored
on any split, and the alignment hands its words over without being imported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from components.data.format import Dataset
from components.data.splits import training_query_subset
from components.text.stems import word_stem
from components.text.vocabulary import tokenize

log = logging.getLogger(__name__)

SEP = "[SEP]"

# One ad's visual words: (word, score) pairs, best first (plain words are accepted too).
Words = Sequence[tuple[str, float]] | Sequence[str]


def normalize_text(text: object) -> str:
    """Whitespace collapsed and stripped; None/NaN become "". (MiniLM lowercases itself.)"""
    if text is None or (isinstance(text, float) and np.isnan(text)) or text is pd.NA:
        return ""
    return " ".join(str(text).split())


def _word(item: str | tuple[str, float]) -> str:
    return item if isinstance(item, str) else str(item[0])


def ad_text(title: str, words: Words | None = None, max_words: int | None = None, *,
            min_score: float = 0.0, skip_title_words: bool = False) -> str:
    """The matcher's text of one ad: "title [SEP] w1 w2 ...", the words their own marked
    segment, most confident first.

    Only the title when there are no words, only the words when the title is empty; words
    keep their order (best first), duplicates dropped, those scored below `min_score` and
    (with `skip_title_words`) those whose stem is already in the title left out, at most
    `max_words` of them.
    """
    title = normalize_text(title)
    title_stems = {word_stem(t) for t in tokenize(title)} if skip_title_words else set()
    kept: list[str] = []
    for item in words or ():
        word = normalize_text(_word(item))
        score = 1.0 if isinstance(item, str) else float(item[1])
        if not word or word in kept or score < min_score or word_stem(word) in title_stems:
            continue
        kept.append(word)
    if max_words is not None:
        kept = kept[:max_words]
    if not kept:
        return title
    if not title:
        return " ".join(kept)
    return f"{title} {SEP} {' '.join(kept)}"


@dataclass
class QuerySide:
    """Queries to score, in row order."""

    query_ids: list[str]
    texts: list[str]

    def __post_init__(self) -> None:
        self.query_ids = [str(q) for q in self.query_ids]
        self.texts = [normalize_text(t) for t in self.texts]
        if len(self.query_ids) != len(self.texts):
            raise ValueError(f"{len(self.query_ids)} query ids but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.query_ids)


@dataclass
class AdSide:
    """Candidate ads, in row order, with whatever inputs the systems may use.

    - `words[i]`: visual words of ad i from the alignment ((word, score), best first);
    - `pooled` (N,1280), `parts` (N,P,1280), `parts_mask` (N,P) bool: image features
      (`components.vision.parts.PartsFeatures` rows in ad order);
    - `evidence` (N,V) float32 with `evidence_words` (V): the alignment's centred per-word
      logits, what the word channel reads (`components.match.words`).
    """

    ad_ids: list[str]
    titles: list[str]
    words: list[list[tuple[str, float]]] | None = None
    pooled: np.ndarray | None = None
    parts: np.ndarray | None = None
    parts_mask: np.ndarray | None = None
    evidence: np.ndarray | None = None
    evidence_words: list[str] | None = None

    def __post_init__(self) -> None:
        self.ad_ids = [str(a) for a in self.ad_ids]
        self.titles = [normalize_text(t) for t in self.titles]
        n = len(self.ad_ids)
        if len(self.titles) != n:
            raise ValueError(f"{n} ad ids but {len(self.titles)} titles")
        if self.words is not None:
            self.words = [[(w, 1.0) if isinstance(w, str) else (str(w[0]), float(w[1])) for w in ws]
                          for ws in self.words]
            if len(self.words) != n:
                raise ValueError(f"{n} ads but words for {len(self.words)}")
        if self.pooled is not None:
            self.pooled = np.asarray(self.pooled, dtype=np.float32)
            if self.pooled.shape[0] != n:
                raise ValueError(f"{n} ads but {self.pooled.shape[0]} pooled vectors")
        if self.parts is not None:
            self.parts = np.asarray(self.parts, dtype=np.float32)  # (N,P,D)
            if self.parts.shape[0] != n:
                raise ValueError(f"{n} ads but {self.parts.shape[0]} part sets")
            if self.parts_mask is None:
                self.parts_mask = np.ones(self.parts.shape[:2], dtype=bool)
            self.parts_mask = np.asarray(self.parts_mask, dtype=bool)
            if self.parts_mask.shape != self.parts.shape[:2]:
                raise ValueError(f"parts_mask {self.parts_mask.shape} does not match parts {self.parts.shape}")
        if self.evidence is not None:
            self.evidence = np.asarray(self.evidence, dtype=np.float32)
            if self.evidence_words is None or self.evidence.shape != (n, len(self.evidence_words)):
                raise ValueError(f"evidence {self.evidence.shape} needs (ads, len(evidence_words)) = "
                                 f"({n}, {None if self.evidence_words is None else len(self.evidence_words)})")

    def __len__(self) -> int:
        return len(self.ad_ids)

    @property
    def has_images(self) -> bool:
        return self.pooled is not None and self.parts is not None

    def texts(self, use_words: bool, max_words: int | None = None, *, min_score: float = 0.0,
              skip_title_words: bool = False) -> list[str]:
        """The ad texts a text tower reads: titles, or `ad_text(title, words, ...)`."""
        if not use_words or self.words is None:
            return list(self.titles)
        return [ad_text(t, w, max_words, min_score=min_score, skip_title_words=skip_title_words)
                for t, w in zip(self.titles, self.words, strict=True)]

    def take(self, index: Sequence[int] | np.ndarray) -> AdSide:
        index = np.asarray(index, dtype=np.int64)
        pick = (lambda a: None if a is None else a[index])  # noqa: E731
        return AdSide(ad_ids=[self.ad_ids[i] for i in index], titles=[self.titles[i] for i in index],
                      words=None if self.words is None else [self.words[i] for i in index],
                      pooled=pick(self.pooled), parts=pick(self.parts), parts_mask=pick(self.parts_mask),
                      evidence=pick(self.evidence), evidence_words=self.evidence_words)


@dataclass
class MatchData:
    """One split for matching: its queries, its ads (every ad a candidate) and its qrels."""

    queries: QuerySide
    ads: AdSide
    qrels: pd.DataFrame = field(repr=False)

    def positives(self) -> np.ndarray:
        """(M,2) int64 (query row, ad row) of every positive qrel of this split, sorted."""
        rel = self.qrels[self.qrels["relevance"] > 0]
        q_row = pd.Index(self.queries.query_ids).get_indexer(rel["query_id"].astype(str))
        a_row = pd.Index(self.ads.ad_ids).get_indexer(rel["ad_id"].astype(str))
        keep = (q_row >= 0) & (a_row >= 0)
        if not keep.all():
            log.warning("%d positive qrels name a query or ad outside this split: ignored", int((~keep).sum()))
        pairs = np.unique(np.stack([q_row[keep], a_row[keep]], axis=1).astype(np.int64), axis=0)
        return pairs.reshape(-1, 2)

    @property
    def has_weights(self) -> bool:
        """The qrels carry a `weight` column (ingested clicks: inverse-propensity weights)."""
        return "weight" in self.qrels.columns

    def pair_weights(self, pairs: np.ndarray) -> np.ndarray:
        """(M,) float64 training weight of each (query row, ad row) pair: its qrels `weight`
        (1 without the column). Several positive qrels of one pair add up: each is evidence
        (a judgement, or a click counting its inverse propensity), as the clicked-pair weights
        of an ingest add up its clicks. A valid dataset has one qrel per pair."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if not self.has_weights:
            return np.ones(len(pairs))
        rel = self.qrels[self.qrels["relevance"] > 0]
        summed = rel.groupby([rel["query_id"].astype(str), rel["ad_id"].astype(str)])["weight"].sum()
        keys = pd.MultiIndex.from_arrays([[self.queries.query_ids[q] for q in pairs[:, 0]],
                                          [self.ads.ad_ids[a] for a in pairs[:, 1]]])
        weights = summed.reindex(keys).to_numpy(dtype=np.float64)
        if np.isnan(weights).any():
            raise ValueError(f"{int(np.isnan(weights).sum())} pairs have no positive qrel to weigh them by")
        return weights

    def explicit_negatives(self) -> dict[int, np.ndarray]:
        """query row -> ad rows (sorted) of its relevance-0 qrels in this split (shown, not
        clicked: labelled negatives), leaving out ads another qrel marks relevant to it."""
        rel = self.qrels
        q_row = pd.Index(self.queries.query_ids).get_indexer(rel["query_id"].astype(str))
        a_row = pd.Index(self.ads.ad_ids).get_indexer(rel["ad_id"].astype(str))
        keep = (q_row >= 0) & (a_row >= 0)
        positive = set(zip(q_row[keep & (rel["relevance"] > 0).to_numpy()],
                           a_row[keep & (rel["relevance"] > 0).to_numpy()], strict=True))
        out: dict[int, set[int]] = {}
        for q, a in zip(q_row[keep & (rel["relevance"] == 0).to_numpy()],
                        a_row[keep & (rel["relevance"] == 0).to_numpy()], strict=True):
            if (q, a) not in positive:
                out.setdefault(int(q), set()).add(int(a))
        return {q: np.array(sorted(ads), dtype=np.int64) for q, ads in sorted(out.items())}


def _words_in_order(ad_ids: list[str], words: Mapping[str, Words] | Sequence[Words]) -> list[list]:
    if isinstance(words, Mapping):
        return [list(words.get(a, [])) for a in ad_ids]
    words = list(words)
    if len(words) != len(ad_ids):
        raise ValueError(f"words for {len(words)} ads, the split has {len(ad_ids)}")
    return [list(w) for w in words]


def match_data(dataset_split: Dataset, words: Mapping[str, Words] | Sequence[Words] | None = None,
               features=None, word_logits=None) -> MatchData:
    """`MatchData` of one split (`dataset.split(name)`).

    `words`: visual words per ad, a mapping ad_id -> [(word, score), ...] (ads missing from
    it get none) or a list in the split's ad order. `features`: a `PartsFeatures` (or any
    object with `pooled`, `parts`, `mask`) whose rows follow the split's ad order.
    `word_logits`: the alignment's per-word logits (`components.align.stage.WordLogits`),
    centred into the ads' `evidence` for the word channel.
    """
    ads_table, queries_table = dataset_split.ads, dataset_split.queries
    ad_ids = ads_table["ad_id"].astype(str).tolist()
    titles = ads_table["title"].astype(object).where(ads_table["title"].notna(), "").tolist()
    pooled = parts = mask = None
    if features is not None:
        pooled, parts, mask = features.pooled, features.parts, features.mask
    evidence = evidence_words = None
    if word_logits is not None:
        from components.match.words import centred_evidence

        evidence = centred_evidence(word_logits.rows(ad_ids), word_logits.means)
        evidence_words = list(word_logits.words)
    ads = AdSide(ad_ids=ad_ids, titles=titles,
                 words=None if words is None else _words_in_order(ad_ids, words),
                 pooled=pooled, parts=parts, parts_mask=mask, evidence=evidence, evidence_words=evidence_words)
    queries = QuerySide(query_ids=queries_table["query_id"].astype(str).tolist(),
                        texts=queries_table["text"].astype(object).where(queries_table["text"].notna(), "").tolist())
    return MatchData(queries=queries, ads=ads, qrels=dataset_split.qrels.reset_index(drop=True))


def training_pairs(data: MatchData, fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Positive (query row, ad row) pairs of a seeded share of the training queries, (M,2).

    The queries with a positive (in row order) go through `training_query_subset`, the same
    selection the alignment's click text uses: for one seed the 25% queries are inside the
    50% ones, which are inside 100%.
    """
    pairs = data.positives()
    queries = np.unique(pairs[:, 0])
    kept_ids = set(training_query_subset([data.queries.query_ids[q] for q in queries], fraction, seed))
    kept = np.array([q for q in queries if data.queries.query_ids[q] in kept_ids], dtype=np.int64)
    return pairs[np.isin(pairs[:, 0], kept)]
