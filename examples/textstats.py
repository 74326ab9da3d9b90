"""Text statistics: pure computation, no storage and no network."""

import re
from collections import Counter
from typing import TypedDict

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


class Summary(TypedDict):
    words: int
    sentences: int
    characters: int
    average_word_length: float


def word_count(text: str) -> int:
    """How many words the text has."""
    return len(_WORD.findall(text))


def summarize(text: str) -> Summary:
    """Counts of words, sentences and characters, and the average word length."""
    words = _WORD.findall(text)
    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    average = sum(map(len, words)) / len(words) if words else 0.0
    return {"words": len(words), "sentences": len(sentences), "characters": len(text),
            "average_word_length": round(average, 2)}


def top_words(text: str, n: int = 5, min_length: int = 1) -> list[list]:
    """The n most frequent words (case-insensitive) as [word, count] pairs."""
    if n < 1:
        raise ValueError("n must be at least 1")
    words = [w.lower() for w in _WORD.findall(text) if len(w) >= min_length]
    return [[word, count] for word, count in Counter(words).most_common(n)]


async def reverse_words(text: str) -> str:
    """The words of the text in reverse order; an async tool."""
    return " ".join(reversed(text.split()))
