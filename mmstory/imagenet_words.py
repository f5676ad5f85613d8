"""ImageNet-1k's classes as the words a caption uses, and the classifier's confidence pooled over classes that share
a word.

ImageNet splits one kind of thing over many classes (120 dog breeds; orange, banana, lemon, ...), so no single class
may be sure when the kind is. Each word here owns a set of classes: its own ("zebra"), or a group's ("fruit", "dog",
"bird"); its confidence is the classifier's probability summed over that set, and the most specific sure word names
the picture. The groups follow WordNet's hypernyms over ImageNet's ordered class indices, written out by hand for the
kinds people photograph (WordNet itself is not on PyPI in a form this package could depend on).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

# A class's caption word where its first ImageNet name is not what a caption says ("tusker" -> elephant). Index:
# word. Every other class is called by its first name's last word ("analog clock" -> clock), lower-cased.
_CLASS_WORD_TEXT = """
7: rooster; 8: hen; 9: ostrich; 22: eagle; 48: lizard; 49: crocodile; 50: alligator; 51: dinosaur
101: elephant; 102: echidna; 104: wallaby; 105: koala; 147: whale; 148: whale; 150: sea lion
275: wild dog; 269: wolf; 270: wolf; 271: wolf; 272: coyote; 276: hyena; 277: fox; 278: fox; 279: fox; 280: fox
281: cat; 282: cat; 283: cat; 284: cat; 285: cat; 286: cougar; 287: lynx; 288: leopard; 289: snow leopard
294: bear; 295: bear; 296: polar bear; 297: bear; 330: rabbit; 331: hare; 332: rabbit; 335: squirrel
339: horse; 341: pig; 342: boar; 345: ox; 346: buffalo; 348: sheep; 349: sheep; 350: goat; 354: camel
383: lemur; 385: elephant; 386: elephant; 387: red panda; 388: panda
403: ship; 404: airplane; 405: airship; 407: ambulance; 409: clock; 412: trash can; 414: backpack; 435: bathtub
436: car; 444: bicycle; 466: train; 468: taxi; 487: phone; 504: mug; 508: keyboard; 510: ship; 511: car
527: computer; 528: phone; 532: table; 547: train; 554: boat; 555: fire truck; 564: bed; 565: train; 569: truck
609: jeep; 610: shirt; 620: laptop; 627: limousine; 628: ship; 651: microwave; 654: bus; 656: van; 661: car
665: moped; 670: scooter; 671: bicycle; 675: truck; 681: laptop; 703: bench; 705: train; 717: truck; 734: van
751: car; 760: refrigerator; 761: remote; 779: bus; 817: car; 820: train; 829: tram; 831: couch; 836: sunglasses
850: teddy bear; 851: television; 861: toilet; 864: truck; 867: truck; 874: bus; 880: unicycle; 892: clock
895: airplane; 896: sink; 908: airplane; 919: sign; 920: traffic light; 930: bread; 933: burger; 934: hot dog
936: cabbage; 948: apple; 956: fruit; 966: wine; 967: coffee; 968: coffee; 970: mountain; 975: lake
976: coast; 977: beach; 978: beach; 981: baseball player; 982: groom; 983: diver; 987: corn; 999: toilet paper
"""

DOG_BREEDS = range(151, 269)  # a caption calls every breed a dog

# Words for groups of classes: "word: first-last first-last ...", inclusive index ranges (WordNet's hypernyms,
# which ImageNet's order keeps together). "animal" is every animal class.
_GROUP_TEXT = """
animal: 0-397
dog: 151-268
cat: 281-285
bird: 7-24 80-100 127-146
fish: 0-6 389-397
snake: 52-68
lizard: 38-48
turtle: 33-37
frog: 30-32
insect: 300-326
butterfly: 321-326
monkey: 365-382
bear: 294-297
elephant: 101 385-386
fruit: 948-957
vegetable: 936-946
food: 924-965
car: 407 436 468 511 609 627 661 751 817
truck: 555 569 675 717 864 867
bus: 654 779 874
train: 466 547 565 705 820 829
airplane: 404 895 908
boat: 403 472 484 510 554 576 625 628 724 780 814 871 914
bicycle: 444 671 870 880
clock: 409 530 892
"""

# Classes that show a person is there (clothes, worn gear, sports kit, and ImageNet's three person classes).
_PERSON_TEXT = """
399 400 411 433 439 445 451 452 457 459 465 474 501 514 515 518 524 552 560 568 578 601 608 610 614 617 630 638 639
643 652 655 667 689 697 735 770 775 796 801 808 834 836 837 841 842 869 887 903 906 981 982 983
416 422 429 430 450 522 543 574 602 693 702 722 746 747 752 768 795 805 852 880 890
"""

# places, buildings, landscapes and the fixed parts of them: a scene to be in, never a caption's subject ("A lumbermill
# is jumping in the air" for a skateboarder in front of one), so a check or hedge never starts a caption with them
_SETTING_TEXT = """
406 410 415 421 424 425 437 442 449 454 460 467 483 489 497 498 500 509 525 536 538 540 562 580 582 598 602 624 634
646 649 663 668 682 698 702 706 716 718 727 743 762 788 819 821 825 832 839 853 854 858 860 865 873 884 888 900 912
915 970 972-980 984
"""

_IRREGULAR_PLURALS = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "ox": "oxen", "wolf": "wolves",
                      "deer": "deer", "buffalo": "buffalo", "bread": "bread", "food": "food", "corn": "corn",
                      "coffee": "coffee", "wine": "wine", "broccoli": "broccoli", "toilet paper": "toilet paper"}


def plural(word: str) -> str:
    """The plural a caption writes ("bus" -> "buses", "strawberry" -> "strawberries"; multi-word: the last word)."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    head, _, last = word.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def setting_classes() -> set[int]:
    """Places, buildings and landscapes: never a caption's subject."""
    return set(_ranges(_SETTING_TEXT))


def _ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split():
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


@dataclass(frozen=True)
class Word:
    """A caption word and the ImageNet classes it covers."""

    text: str
    classes: tuple[int, ...]

    @property
    def plural(self) -> str:
        return plural(self.text)

    @property
    def forms(self) -> tuple[str, str]:
        return self.text, self.plural


class ImageNetWords:
    """The caption words of ImageNet-1k's classes and of their groups, with pooled confidences."""

    def __init__(self, class_names: list[str]):
        if len(class_names) != 1000:
            raise ValueError(f"ImageNet words need ImageNet-1k's 1000 class names, got {len(class_names)}")
        overrides = {int(k): v.strip() for k, v in
                     (entry.split(":") for line in _CLASS_WORD_TEXT.split("\n") for entry in line.split(";")
                      if entry.strip())}
        self.class_word = [overrides.get(i, "dog" if i in DOG_BREEDS else name.split()[-1].lower())
                           for i, name in enumerate(class_names)]
        self.word_of_class = {name.lower(): word for name, word in zip(class_names, self.class_word)}
        members: dict[str, set[int]] = {}
        for i, word in enumerate(self.class_word):
            members.setdefault(word, set()).add(i)
        for line in _GROUP_TEXT.strip().splitlines():
            word, _, ranges = line.partition(":")
            members.setdefault(word.strip(), set()).update(_ranges(ranges))
        self.words = [Word(w, tuple(sorted(c))) for w, c in sorted(members.items())]
        self.index = {w.text: i for i, w in enumerate(self.words)}
        # one-word plurals back to their word, for a caption that put a plural after "a"
        self.singular = {w.plural: w.text for w in self.words if " " not in w.text and w.plural != w.text}
        membership = torch.zeros(len(self.words), 1000)
        for i, word in enumerate(self.words):
            membership[i, list(word.classes)] = 1.0
        self.membership = membership  # [words, classes]
        self.sizes = membership.sum(1)
        self.person_classes = _ranges(_PERSON_TEXT)
        setting = setting_classes()
        self.settings = tuple(w.text for w in self.words if set(w.classes) <= setting)
        self.animal = self.words[self.index["animal"]]
        animals, food = set(self.animal.classes), set(self.words[self.index["food"]].classes)
        # what a story may make a character of ("cheetah", "oystercatcher", "bird"; "stove", "airliner") and what it
        # may not ("pizza", "banana"): a word whose classes are all animals, all food, or none of them animal, food
        # or a setting
        self.animal_words = frozenset(w.text for w in self.words if set(w.classes) <= animals)
        self.food_words = frozenset(w.text for w in self.words if set(w.classes) <= food)
        self.thing_words = frozenset(w.text for w in self.words if not set(w.classes) & (animals | food | setting))

    def pooled(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, words]: the classifier's probability summed over each word's classes."""
        return probs.float() @ self.membership.T

    def sure_word(self, pooled_row: torch.Tensor, threshold: float, exclude: tuple[str, ...] = ("animal",)
                  ) -> tuple[Word, float] | None:
        """The most specific word (fewest classes) whose pooled confidence is at least `threshold`, or None."""
        sure = [(int(self.sizes[i]), -float(pooled_row[i]), i) for i in (pooled_row >= threshold).nonzero().flatten()
                .tolist() if self.words[i].text not in exclude]
        if not sure:
            return None
        _, _, best = min(sure)
        return self.words[best], float(pooled_row[best])

    def confidence(self, pooled_row: torch.Tensor, word: str) -> float:
        return float(pooled_row[self.index[word]]) if word in self.index else 0.0

    def person_evidence(self, probs_row: torch.Tensor) -> float:
        """The classifier's mass on classes that show a person (clothes, sports kit, diver, groom, ...)."""
        return float(probs_row[self.person_classes].sum())

    def animal_mass(self, probs_row: torch.Tensor) -> float:
        return float(probs_row[list(self.animal.classes)].sum())


@functools.cache
def imagenet_words() -> ImageNetWords:
    """The table for ImageNet-1k, built once per process."""
    from mmstory.components import _imagenet_synonyms

    return ImageNetWords([names[0] for names in _imagenet_synonyms()])
