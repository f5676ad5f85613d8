"""Novel-object swaps: teach the caption decoder to name what its ImageNet tags name, including words no training
caption uses.

Where a caption's noun agrees with one of the image's top classes ("A black dog runs", Labrador retriever), the
noun and that class's tag are swapped, now and then, for another ImageNet class and its word ("A black zebra runs",
zebra). The image still shows a dog, so the decoder learns that the subject's name comes from the tag and the rest of
the sentence from the picture: the slot-filling of Neural Baby Talk (Lu et al., 2018) and the tag-copying of
novel-object captioning (nocaps' out-of-domain split) taught by data rather than a new layer. Flickr8k's captions
name only Flickr8k's things; this is how "zebra", "banana" and "airliner" get trained rows in the decoder.
"""

from __future__ import annotations

import random
import re

import torch

from mmstory.imagenet_words import DOG_BREEDS, ImageNetWords, plural, setting_classes


class NovelObjectSwap:
    """Swaps a caption's noun and its agreeing tag for another ImageNet class, with probability `probability` per
    caption that has such a noun (captions with none are left alone)."""

    def __init__(self, table: ImageNetWords, probability: float):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"novel_object_swap must be in [0, 1], got {probability}")
        self.probability = probability
        # places (never a subject) and what a person wears or holds ("A man in a red sea lion") are left out on
        # both sides
        left_out = setting_classes() | set(table.person_classes)
        # a class's caption words: its own word and the groups it belongs to (a breed is also "dog"), not "animal"
        self.words_of_class: list[set[str]] = [set() for _ in range(1000)]
        for word in table.words:
            if word.text in ("animal", "food"):
                continue
            for c in set(word.classes) - left_out:
                self.words_of_class[c].add(word.text)
        # per class, its words (longest first: "polar bear" before "bear") with a pattern for either number, built once
        self.patterns = [[(w, re.compile(rf"\b(?:{re.escape(w)}|{re.escape(plural(w))})\b"))
                          for w in sorted(words, key=len, reverse=True)] for words in self.words_of_class]
        # what a noun may become: every other class word but dogs (the word replaced most); each word once, whatever
        # its number of classes
        targets: dict[str, list[int]] = {}
        for c, word in enumerate(table.class_word):
            if c not in left_out and c not in DOG_BREEDS:
                targets.setdefault(word, []).append(c)
        self.targets = sorted(targets.items())

    def target_words(self) -> list[str]:
        """Every form a swap may write, so the caption vocabulary has room for them before training."""
        return [form for word, _ in self.targets for form in dict.fromkeys((word, plural(word)))]

    def __call__(self, captions: list[str], top_classes: torch.Tensor, seed: int = 0
                 ) -> tuple[list[str], torch.Tensor]:
        """Captions and [B, k] top classes, some of them swapped (new objects; the inputs are not changed); the same
        seed draws the same swaps."""
        rng = random.Random(seed)
        out_captions, out_classes = list(captions), top_classes.clone()
        for row, caption in enumerate(captions):
            classes = top_classes[row].tolist()
            agreeing = self._agreeing_word(caption, classes)
            if agreeing is None or rng.random() >= self.probability:
                continue
            word, target_word, target_classes = agreeing, *rng.choice(self.targets)
            if target_word in self.words_of_class[classes[0]] or target_word == word:
                continue
            out_captions[row] = replace_word(caption, word, plural(word), target_word, plural(target_word))
            # the first tag that named the noun names the new class; the others that did name its neighbours in
            # ImageNet's order (WordNet's, so near kinds: a zebra's are horses and hartebeests), as a real photo's
            # tags would, not the same class again
            new_class = rng.choice(target_classes)
            slots = [slot for slot, c in enumerate(classes) if word in self.words_of_class[c]]
            neighbours = [n for n in range(new_class - 3, new_class + 4) if 0 <= n < 1000 and n != new_class]
            for slot in slots:
                out_classes[row, slot] = new_class if slot == slots[0] else rng.choice(neighbours)
        return out_captions, out_classes

    def _agreeing_word(self, caption: str, classes: list[int]) -> str | None:
        """The first (by class rank) caption word that one of the image's top classes is called by, or None."""
        lowered = caption.lower()
        for c in classes:
            for word, pattern in self.patterns[c]:
                if pattern.search(lowered):
                    return word
        return None


def replace_word(caption: str, word: str, word_plural: str, new: str, new_plural: str) -> str:
    """`caption` with every `word` / `word_plural` (any case) replaced by `new` / `new_plural`, and "a"/"an" before
    it mended."""
    def swap(match: re.Match) -> str:
        article, found = match.group(1), match.group(2)
        replacement = new_plural if found.lower() == word_plural and word_plural != word else new
        if article:
            a = "an" if replacement[0] in "aeiou" else "a"
            article = (a.capitalize() if article[0].isupper() else a) + article[len(article.rstrip()):]
        return (article or "") + replacement
    forms = sorted({word, word_plural}, key=len, reverse=True)
    pattern = rf"\b(an?\s+)?({'|'.join(re.escape(f) for f in forms)})\b"
    return re.sub(pattern, swap, caption, flags=re.IGNORECASE)
