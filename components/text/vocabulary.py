"""Content-word vocabulary of free text (titles, descriptions, captions).

Content words = lowercase alphabetic tokens of at least `min_length` letters, English stop
words and generic shop/clip-art filler removed, kept when frequent enough.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

TOKEN_PATTERN = re.compile(r"[a-z][a-z'\-]*[a-z]|[a-z]")

# Words that say nothing about what a picture shows.
EXTRA_STOP_WORDS = frozenset({
    "clipart", "clip", "art", "svg", "image", "picture", "icon", "vector", "illustration",
    "drawing", "graphic", "version", "remix", "simple", "new", "old", "set", "collection",
})


@cache
def stop_words() -> frozenset[str]:
    """scikit-learn's English stop words and ours. Imported on first use: importing
    scikit-learn costs a one-off search about a second of start-up, for a list it never reads."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | EXTRA_STOP_WORDS


def tokenize(text: str) -> list[str]:
    """Lowercase alphabetic tokens (hyphenated words kept whole)."""
    return TOKEN_PATTERN.findall(str(text).lower().replace("_", " "))


def content_words(text: str, min_length: int = 3) -> list[str]:
    """The content words of one text, in order, duplicates kept."""
    return [t for t in tokenize(text)
            if len(t) >= min_length and t not in stop_words()]


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]
    counts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def to_dict(self) -> dict:
        return {"words": list(self.words), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        return cls(words=tuple(data["words"]), counts=tuple(int(c) for c in data["counts"]))


def build_vocabulary(texts: Iterable[str], min_count: int = 2, max_words: int | None = None,
                     min_length: int = 3) -> Vocabulary:
    """Words occurring in at least `min_count` texts (document frequency), most frequent first,
    ties broken alphabetically so the result is deterministic."""
    doc_freq: Counter[str] = Counter()
    for text in texts:
        doc_freq.update(set(content_words(text, min_length)))
    ranked = sorted(((w, c) for w, c in doc_freq.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
    if max_words is not None:
        ranked = ranked[:max_words]
    return Vocabulary(words=tuple(w for w, _ in ranked), counts=tuple(c for _, c in ranked))
