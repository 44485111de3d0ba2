"""Word stems shared by alignment, matching and evaluation (plural- and possessive-insensitive)."""

from __future__ import annotations


def word_stem(word: str) -> str:
    """A crude lemma: possessive and plural endings off ("boxes" -> "box", "berries" -> "berry")."""
    w = word.lower().removesuffix("'s")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w
