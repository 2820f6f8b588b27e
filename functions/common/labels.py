"""Order labels for display: the most specific first."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["headline_names"]


def headline_names(labels: list[dict[str, Any]], count: int) -> list[str]:
    """Return up to COUNT label names, most specific first.

    Rekognition gives a parent at least its best child's confidence, so sorting by confidence alone
    puts "Animal" before "Cat". A label that is another label's parent is listed after the labels
    that are nobody's parent. Among those parents, one with more ancestors is more specific
    ("Rocket" under "Aircraft" under "Vehicle") and comes first. Ties keep the confidence order.
    A label whose words all appear, in order, in another label shown ("Table" beside "Dining
    Table", "Coffee" beside "Coffee Cup", "Shirt" beside "T-Shirt") only repeats it and is left
    out; of the two, the one with more words stays, in the place of the first. Names that differ
    only in case or punctuation are shown once, and blank names not at all.
    """
    parents = {
        str(parent["Name"])
        for label in labels
        for parent in label.get("Parents", [])
        if "Name" in parent
    }
    ranked = sorted(labels, key=lambda label: -float(label.get("Confidence", 0.0)))
    specific = [str(label["Name"]) for label in ranked if str(label["Name"]) not in parents]
    general = [
        str(label["Name"])
        for label in sorted(ranked, key=lambda label: -len(label.get("Parents", [])))
        if str(label["Name"]) in parents
    ]
    listed: list[str] = []
    for name in specific + general:
        if len(listed) == count:
            break
        if not _words(name) or any(
            _words(name) == _words(other) or _repeats(name, other) for other in listed
        ):
            continue
        shorter = next((index for index, other in enumerate(listed) if _repeats(other, name)), None)
        if shorter is not None:
            listed[shorter] = name
            # Any other shorter name it repeats goes too.
            listed = [other for other in listed if other == name or not _repeats(other, name)]
        else:
            listed.append(name)
    return listed


def _words(name: str) -> list[str]:
    """Return the words of NAME in lower case, split at spaces, hyphens and punctuation."""
    return re.findall(r"\w+", name.lower())


def _repeats(name: str, other: str) -> bool:
    """Return whether NAME's words all appear, one after another, among OTHER's words."""
    words, other_words = _words(name), _words(other)
    if not words or len(words) >= len(other_words):
        return False
    return any(
        other_words[start : start + len(words)] == words
        for start in range(len(other_words) - len(words) + 1)
    )
