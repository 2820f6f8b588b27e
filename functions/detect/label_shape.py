"""The label shape every backend returns: Amazon Rekognition's DetectLabels, trimmed."""

from __future__ import annotations

from typing import Any

__all__ = ["trim_labels"]

_MAX_INSTANCES = 10


def trim_labels(
    labels: list[dict[str, Any]],
    *,
    max_labels: int,
    min_confidence: float,
    excluded: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Return at most MAX_LABELS labels of at least MIN_CONFIDENCE, best first, minus EXCLUDED.

    Each label keeps Name, Confidence (rounded to 0.1), Parents and Categories (as {"Name": ...})
    and at most ten Instances with their bounding boxes, so a run's state stays small.
    """
    excluded_lower = {name.lower() for name in excluded}
    kept = [
        label
        for label in labels
        if float(label.get("Confidence", 0.0)) >= min_confidence
        and str(label.get("Name", "")).lower() not in excluded_lower
    ]
    kept.sort(key=lambda label: -float(label["Confidence"]))
    return [_trim_one(label) for label in kept[:max_labels]]


def _trim_one(label: dict[str, Any]) -> dict[str, Any]:
    instances = [
        {
            "BoundingBox": {
                side: round(float(value), 4)
                for side, value in instance.get("BoundingBox", {}).items()
                if side in {"Width", "Height", "Left", "Top"}
            },
            "Confidence": round(float(instance.get("Confidence", label["Confidence"])), 1),
        }
        for instance in label.get("Instances", [])[:_MAX_INSTANCES]
        if instance.get("BoundingBox")
    ]
    return {
        "Name": str(label["Name"]),
        "Confidence": round(float(label["Confidence"]), 1),
        "Parents": [{"Name": str(parent["Name"])} for parent in label.get("Parents", [])],
        "Categories": [{"Name": str(cat["Name"])} for cat in label.get("Categories", [])],
        "Instances": instances,
    }
