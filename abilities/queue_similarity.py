"""The prompt queue's duplicate check: a prompt too similar to a queued one (Jaccard similarity of their
word sets, stop words left out) is reported instead of added twice."""

from __future__ import annotations

import re
from typing import Any

# Duplicate check (DM's SimilarityEngine: tokenize + jaccard, DEFAULT_JACCARD_THRESHOLD).
JACCARD_THRESHOLD = 0.65
STOP_WORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "and",
        "or",
        "but",
        "in",
        "on",
        "at",
        "to",
        "for",
        "of",
        "with",
        "by",
        "from",
        "is",
        "it",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "do",
        "does",
        "did",
        "will",
        "would",
        "could",
        "should",
        "may",
        "might",
        "shall",
        "can",
        "not",
        "no",
        "if",
        "when",
        "what",
        "why",
        "how",
        "who",
        "where",
        "which",
        "that",
        "this",
        "you",
        "your",
        "my",
        "am",
        "me",
        "we",
        "they",
        "them",
        "its",
    ]
)
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> set[str]:
    """Significant lowercase words: [a-z0-9]+, at least 2 characters, no stop words (a set)."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 2 and w not in STOP_WORDS}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def best_match(prompt: str, queue: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most similar queued prompt when its similarity reaches the threshold (the first one on ties)."""
    words = tokenize(prompt)
    best: dict[str, Any] | None = None
    best_score = 0.0
    for index, item in enumerate(queue):
        text = item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(text, str):
            continue
        score = jaccard(words, tokenize(text))
        if score > best_score:
            best_score = score
            best = {"index": index, "prompt": text, "similarity": round(score, 3)}
    return best if best is not None and best_score >= JACCARD_THRESHOLD else None
