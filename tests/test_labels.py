"""Which labels the watermark and the command line show first."""

from __future__ import annotations

from functions.common.labels import headline_names


def _label(name: str, confidence: float, *parents: str) -> dict:
    return {
        "Name": name,
        "Confidence": confidence,
        "Parents": [{"Name": parent} for parent in parents],
    }


def test_headline_puts_leaf_before_parents() -> None:
    labels = [
        _label("Animal", 97.0),
        _label("Mammal", 96.0, "Animal"),
        _label("Cat", 92.0, "Pet", "Mammal", "Animal"),
    ]

    assert headline_names(labels, 3) == ["Cat", "Mammal", "Animal"]


def test_headline_orders_parents_by_depth() -> None:
    # Rekognition-style: each parent is at least as confident as its children.
    labels = [
        _label("Vehicle", 84.7, "Transportation"),
        _label("Transportation", 84.7),
        _label("Aircraft", 84.2, "Vehicle", "Transportation"),
        _label("Rocket", 83.8, "Spaceship", "Aircraft", "Vehicle", "Transportation"),
        _label("Spaceship", 83.8, "Aircraft", "Vehicle", "Transportation"),
        _label("Missile", 82.4, "Aircraft", "Rocket", "Spaceship", "Transportation", "Vehicle"),
    ]

    assert headline_names(labels, 3) == ["Missile", "Rocket", "Spaceship"]


def test_headline_keeps_confidence_order_among_leaves() -> None:
    labels = [_label("Dog", 60.0), _label("Person", 90.0), _label("Chair", 75.0)]

    assert headline_names(labels, 2) == ["Person", "Chair"]


def test_headline_of_no_labels_is_empty() -> None:
    assert headline_names([], 3) == []


def test_headline_puts_repeating_parent_last() -> None:
    labels = [
        _label("Cup", 93.8),
        _label("Furniture", 88.0),
        _label("Table", 85.0, "Furniture"),
        _label("Dining Table", 80.0, "Table", "Furniture"),
        _label("Espresso", 60.0, "Coffee Cup", "Cup"),
        _label("Coffee Cup", 41.4, "Cup"),
    ]

    assert headline_names(labels, 3) == ["Dining Table", "Espresso", "Coffee Cup"]
    assert headline_names(labels, 6) == ["Dining Table", "Espresso", "Coffee Cup", "Furniture"]


def test_headline_leaves_out_repeated_words() -> None:
    cases = [
        ([_label("Dining Table", 90.0, "Table", "Furniture"), _label("Table", 90.0, "Furniture"),
          _label("Furniture", 90.0)], ["Dining Table", "Furniture"]),
        ([_label("Table", 95.0), _label("Dining Table", 80.0), _label("Furniture", 70.0)],
         ["Dining Table", "Furniture"]),
        ([_label("Table Lamp", 90.0, "Lamp", "Table"), _label("Table", 90.0),
          _label("Lamp", 90.0), _label("Furniture", 80.0)], ["Table Lamp", "Furniture"]),
        ([_label("Espresso", 90.0, "Coffee Cup", "Coffee"), _label("Coffee Cup", 85.0, "Cup"),
          _label("Coffee", 85.0), _label("Cup", 85.0)], ["Espresso", "Coffee Cup"]),
    ]  # fmt: skip

    for labels, expected in cases:
        assert headline_names(labels, 3) == expected


def test_headline_shows_same_name_once() -> None:
    labels = [
        _label("Dining Table", 90.0),
        _label("dining table", 85.0),
        _label("  ", 84.0),
        _label("T-Shirt", 80.0),
        _label("Shirt", 79.0),
        _label("Cat", 70.0),
    ]

    assert headline_names(labels, 3) == ["Dining Table", "T-Shirt", "Cat"]
