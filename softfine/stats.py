"""What a split holds: its entity categories, gold entities per category, categories that dev or
test has and train never, and the paper's Table 1 figures."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .data import Sentence


def categories(sentences: Sequence[Sentence]) -> list[str]:
    """Sorted entity categories that occur in `sentences`."""
    return sorted({tag[2:] for s in sentences for tag in s.tags if tag != "O"})


def entity_counts(sentences: Sequence[Sentence]) -> dict[str, int]:
    """Gold entities per category."""
    return dict(Counter(tag[2:] for s in sentences for tag in s.tags if tag[0] in "BS"))


def unseen_categories(splits: dict[str, Sequence[Sentence]]) -> dict[str, dict[str, int]]:
    """Per split other than train: its gold entities of categories that train never has, counted
    per category (a model can only learn them as they are scored: missed)."""
    seen = set(categories(splits.get("train", ())))
    unseen = {}
    for split, sentences in splits.items():
        counts = {c: n for c, n in entity_counts(sentences).items() if c not in seen}
        if split != "train" and counts:
            unseen[split] = dict(sorted(counts.items()))
    return unseen


def stats(sentences: Sequence[Sentence]) -> dict:
    """The figures of the paper's Table 1: sentences, average characters, average entities, categories."""
    n = len(sentences)
    n_entities = sum(tag[0] in "BS" for s in sentences for tag in s.tags)
    return {
        "sentences": n,
        "avg_chars": sum(map(len, sentences)) / n if n else 0.0,
        "avg_entities": n_entities / n if n else 0.0,
        "categories": len(categories(sentences)),
    }
