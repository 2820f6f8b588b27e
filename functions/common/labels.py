"""Order labels for display: the most specific first."""

from __future__ import annotations

from typing import Any

__all__ = ["headline_names"]


def headline_names(labels: list[dict[str, Any]], count: int) -> list[str]:
    """Return up to COUNT label names, most specific first.

    Rekognition gives a parent at least its best child's confidence, so sorting by confidence alone
    puts "Animal" before "Cat". A label that is another label's parent is listed after the labels
    that are nobody's parent. Among those parents, one with more ancestors is more specific
    ("Rocket" under "Aircraft" under "Vehicle") and comes first. Ties keep the confidence order.
    A parent whose name ends a name listed before it ("Table" after "Dining Table") only repeats
    it, so it goes after the other parents.
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
    listed = list(specific)
    repeats = []
    for name in general:
        if any(other.lower().endswith(" " + name.lower()) for other in listed):
            repeats.append(name)
        else:
            listed.append(name)
    return (listed + repeats)[:count]
