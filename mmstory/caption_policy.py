"""How a caption is chosen: one readable policy over what the model returns (the caption decoder's beams, their
agreement with the image under the contrastive heads, and the ImageNet classifier's probabilities).

The steps, each recorded in the trace it returns:
1. vocabulary: the classifier's probabilities pooled over the classes that share a word (`mmstory.imagenet_words`);
   every ImageNet word, in the decoder's open vocabulary, gets the classifier's log-odds as a logit bias;
2. rerank: the beams by log-probability + `caption_rerank` x agreement; at the end (`choose`), + `caption_fluency` x
   the story writer's length-normalised log-probability of the beam, among the beams that name the same kind of
   subject and nothing else: the English the caption decoder's small data did not teach it;
3. check: the most specific word at least `caption_class_check` sure, when the caption does not name it (nor a more
   general word for it: "A bird" for an egret), the classifier does not support the caption's subject (a person or
   an animal) and the caption's agreement is under `caption_check_agreement`: the caption is written again from
   "A <word>" (the word fills the subject's slot and the decoder goes on, as in Neural Baby Talk); else a word at
   least `caption_concepts` sure that the caption does not name is required (constrained beam search);
   an animal word at least `caption_animal_rival` sure and surer than the caption's own animal subject takes
   its place the same way;
4. hedge: with no sure word, an unsupported subject and agreement under `caption_hedge_agreement`, the caption
   starts from the most specific word at least `caption_hedge` sure ("An animal"), or stays, marked unsure;
5. tidy: the forms a forced word leaves behind ("on a buses", "A baseball baseball player") are mended;
6. trim: after a forced word, the phrases that name a thing under `caption_trim` (or an animal without support),
   and after a forced thing what only a creature does, are dropped (`mmstory.caption_text`): "A hot dog in front of
   a white boat." -> "A hot dog.", "A train is walking down the street." -> "A train on the street.";
7. place: an unsure caption whose animal subject nothing supports names only its place (`caption_place_when_unsure`):
   "A brown dog is sitting in a room." -> "A room.", with the things the classifier sees there at `PLACE_THINGS`
   ("Also seen: chair" for the story writer) and no person unless the caption names one.
The model decodes, the policy decides (`revise` after the first beams, `choose` at the end); what the classifier
vouches for is asked of `mmstory.caption_evidence`, and the caption's text is mended by `mmstory.caption_text`. Every
switch lives in `GenerationConfig` (generation_config.json beside the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmstory.caption_evidence import ANIMAL_CLASSES, DOG_CLASSES, HOUSE_CAT_CLASSES, Evidence, kind, names
from mmstory.caption_text import agree_in_number, article, caption_subject, place, says_twice, subject_group, tidy, trim
from mmstory.config import GenerationConfig
from mmstory.imagenet_words import ImageNetWords, Word
from mmstory.text import names_person, object_mentions, words

# step 7: the things at least this sure beside a place-only caption go to the story writer ("A room." + chair), so
# that two rooms are not one story
PLACE_THINGS = 0.1


@dataclass
class CaptionChoice:
    """A caption, how sure it is, and what each step did."""

    caption: str
    confidence: float  # the classifier's pooled probability of what the caption names, or its agreement's share
    sure: bool  # the subject is one the classifier or the agreement vouches for
    agreement: float = 0.0  # the caption's agreement with the image under the contrastive heads (the rerank's)
    words: list[tuple[str, float]] = field(default_factory=list)  # the classifier's top pooled words
    trace: list[str] = field(default_factory=list)
    people: bool = True  # the picture shows a person: the caption names one or the classifier's evidence does
    also: list[str] = field(default_factory=list)  # things the classifier sees beside a place-only caption (step 7)

    def to_dict(self) -> dict:
        return {"caption": self.caption, "confidence": round(self.confidence, 4), "sure": self.sure,
                "agreement": round(self.agreement, 4),
                "words": [(w, round(p, 4)) for w, p in self.words], "trace": self.trace, "people": self.people,
                "also": self.also}


@dataclass
class CaptionPlan:
    """Per image: the classifier's probabilities, pooled, and what the second beam search must do (`revise`)."""

    pooled: torch.Tensor  # [words]
    probs: torch.Tensor  # [1000]
    prefix: tuple[int, ...] = ()  # compact ids every caption starts with
    required: tuple[int, ...] | None = None  # compact ids of which every caption writes one
    banned: tuple[int, ...] = ()  # compact ids no caption may write: the words of a subject the classifier ruled out
    opening: str = ""  # the words every caption starts with ("A hot dog"), where `prefix` is set
    trace: list[str] = field(default_factory=list)


class CaptionPolicy:
    """Steps 1-4 above for one model's settings and word table. `forms` maps a word to its compact ids (singular,
    plural); `opening` gives the compact ids of a caption's first word ("A", "An", "Some")."""

    MASS = frozenset({"food", "fruit", "bread", "coffee", "wine", "corn", "broccoli", "toilet paper", "hay"})

    def __init__(self, config: GenerationConfig, table: ImageNetWords, forms: dict[str, tuple[int, ...]] | None,
                 opening=None, creatures: dict[str, tuple[int, ...]] | None = None):
        self.config, self.table, self.forms, self.opening = config, table, forms or {}, opening
        self.creatures = creatures or {}  # per person or animal group, the compact ids of its words
        self.evidence = Evidence(config, table)

    # --- 1. vocabulary ---------------------------------------------------------------------------------------------
    def plan(self, probs: torch.Tensor) -> list[CaptionPlan]:
        return [CaptionPlan(row, p_row) for p_row, row in zip(probs, self.table.pooled(probs))]

    def logit_bias(self, plans: list[CaptionPlan], size: int, base: int) -> torch.Tensor | None:
        """[images, size]: 0 over the fitted vocabulary; each added word its classifier log-odds (an added word
        borrows its donor's logit, so it wins over the donor exactly when the classifier favours it)."""
        if size == base:
            return None
        columns = [(j, self.table.index[word]) for word, ids in self.forms.items() for j in ids if j >= base]
        bias = torch.full((len(plans), size), float("-inf"))
        bias[:, :base] = 0.0
        if columns:
            cols, words_ = (torch.tensor(c) for c in zip(*columns))
            p = torch.stack([plan.pooled for plan in plans])[:, words_].clamp(1e-6, 1 - 1e-6)
            bias[:, cols] = (p / (1 - p)).log()
        return bias

    # --- 2. rerank -------------------------------------------------------------------------------------------------
    def rerank(self, beams: list[tuple[float, str]], agreement: list[float], plan: CaptionPlan | None = None,
               fluency: list[float] | None = None) -> int:
        """The index of the beam with the best log-probability + `caption_rerank` x agreement (then, `fluency` given,
        + `caption_fluency` x it among the beams that say the same things); with a plan, a beam whose subject is the
        animal the classifier is sure of comes first ("A cat is sitting on a wall." over "A person is sitting on the
        top of a cat.")."""
        weight = self.config.caption_rerank
        fluent = [0.0] * len(beams) if fluency is None else [self.config.caption_fluency * f for f in fluency]
        sure_kind = None
        found = None if plan is None else self._sure(plan, self.config.caption_class_check)
        if found is not None and set(found[0].classes) <= set(ANIMAL_CLASSES):
            sure_kind = kind(found[0])
        first = [sure_kind is not None and subject_group(text) in sure_kind for _, text in beams]
        best = max(range(len(beams)), key=lambda j: (first[j], beams[j][0] + weight * agreement[j]))
        if fluency is None:
            return best
        # the writer's English picks the wording, not what is named: the kind of subject and the objects stay the
        # picture's and the decoder's call; and a beam that says a thing twice is out, however likely the writer
        # finds it
        group, named = subject_group(beams[best][1]), set(object_mentions(beams[best][1]))
        same = [j for j in range(len(beams)) if j == best or (
            first[j] == first[best] and subject_group(beams[j][1]) == group
            and set(object_mentions(beams[j][1])) <= named and not says_twice(beams[j][1]))]
        return max(same, key=lambda j: beams[j][0] + weight * agreement[j] + fluent[j])

    # --- 3-4. check and hedge: what the second beam search must do -------------------------------------------------
    def revise(self, plan: CaptionPlan, caption: str, agreement: float) -> bool:
        """Set `plan.prefix` or `plan.required` when `caption` (the first search's choice) must be written again;
        True when it must."""
        group = subject_group(caption)
        checked = self._sure(plan, self.config.caption_class_check, subject=True)
        if checked is not None:
            word, p = checked
            if names(caption, word):
                return False
            if self._covers(group, word):
                plan.trace.append(f"check: '{word.text}' ({p:.2f}) is a kind of the caption's {group}")
                return False
            animal = set(word.classes) <= set(ANIMAL_CLASSES)
            pet = set(word.classes) <= set(DOG_CLASSES) or set(word.classes) <= set(HOUSE_CAT_CLASSES)
            keep_subject = group is None or (group == "person" and (pet or self.evidence.supported(plan, group))) or (
                not animal and group != "person" and self.evidence.supported(plan, group, p))
            trusted = (self.config.caption_check_agreement is not None
                       and agreement >= self.config.caption_check_agreement)
            if not keep_subject and trusted:  # the heads agree with the caption: it stays, the word is not forced
                plan.trace.append(f"check: '{word.text}' ({p:.2f}) left out: the caption's agreement is "
                                  f"{agreement:.2f}")
                return False
            if not keep_subject and self._start_with(plan, word, f"check: '{word.text}' ({p:.2f}), not the "
                                                                 f"caption's {group}", rejected=group):
                return True
        rival = self._animal_rival(plan, caption, group)
        if rival is not None and self._start_with(plan, rival[0], f"rival: '{rival[0].text}' ({rival[1]:.2f}) "
                                                                  f"over the caption's {group} ({rival[2]:.2f})",
                                                  rejected=group):
            return True
        concept = self._sure(plan, self.config.caption_concepts)
        if concept is not None:
            word, p = concept
            if not names(caption, word) and word.text in self.forms:
                plan.required = self.forms[word.text]
                plan.trace.append(f"vocabulary: '{word.text}' ({p:.2f}) must be written")
                return True
            return False
        if self.config.caption_hedge <= 0 or group is None or agreement >= self.config.caption_hedge_agreement:
            return False
        if self.evidence.supported(plan, group):
            return False
        found = self.table.sure_word(plan.pooled, self.config.caption_hedge, exclude=self.table.settings)
        if found is None or found[0].text == group:
            return False
        return self._start_with(plan, found[0], f"hedge: nothing vouches for the caption's {group} (agreement "
                                                f"{agreement:.2f}); '{found[0].text}' is {found[1]:.2f} sure",
                                rejected=group)

    def _covers(self, group: str | None, word: Word) -> bool:
        """The caption's subject is a more general word for `word` ("A bird" for an egret): less specific, not wrong."""
        if group in (None, "animal") or group not in self.table.index:
            return False
        return set(word.classes) <= set(self.table.words[self.table.index[group]].classes)

    def _animal_rival(self, plan: CaptionPlan, caption: str, group: str | None) -> tuple[Word, float, float] | None:
        """The animal the classifier is surer of than of the caption's own animal subject: (word, its confidence,
        the caption's animal's), or None."""
        if group in (None, "person") or self.config.caption_animal_rival <= 0:
            return None
        found = self._sure(plan, self.config.caption_animal_rival, subject=True)
        if found is None or not set(found[0].classes) <= set(ANIMAL_CLASSES) or names(caption, found[0]):
            return None
        own = self.table.confidence(plan.pooled, group) if group in self.table.index else 0.0
        return (*found, own) if found[1] > own else None

    def _sure(self, plan: CaptionPlan, threshold: float, subject: bool = False) -> tuple[Word, float] | None:
        """The most specific word at least `threshold` sure; `subject`: one that can start a caption (no setting)."""
        exclude = ("animal", *self.table.settings) if subject else ("animal",)
        return self.table.sure_word(plan.pooled, threshold, exclude=exclude) if threshold > 0 else None

    def _start_with(self, plan: CaptionPlan, word: Word, why: str, rejected: str | None = None) -> bool:
        """Write the caption again from "A <word>"; with `caption_ban_rejected`, without the `rejected` subject's
        words, so that the decoder's habit does not bring the dog back after the toilet ("A toilet of a small white
        and brown dog ...")."""
        if word.text not in self.forms or self.opening is None:
            return False
        opening = "Some" if word.text in self.MASS else article(word.text)
        plan.prefix = (*self.opening(opening), self.forms[word.text][0])
        plan.opening = f"{opening} {word.text}"
        plan.trace.append(f"{why}: the caption starts '{opening} {word.text}'")
        if self.config.caption_ban_rejected and rejected in self.creatures:
            plan.banned = tuple(i for i in self.creatures[rejected] if i not in plan.prefix)
            plan.trace.append(f"ban: no {rejected} words after it")
        return True

    def ban_rejected(self, plans: list[CaptionPlan], bias: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """The logit bias [images, size] with each plan's banned words at -inf (None when nothing is banned)."""
        if not any(plan.banned for plan in plans):
            return bias
        bias = torch.zeros(len(plans), size) if bias is None else bias.clone()
        for row, plan in enumerate(plans):
            bias[row, list(plan.banned)] = float("-inf")
        return bias

    def choose(self, plan: CaptionPlan | None, beams: list[tuple[float, str]], agreement: list[float],
               first_choice: str | None = None, fluency: list[float] | None = None) -> CaptionChoice:
        """The final caption among `beams` (from the second search when there was one), how sure it is, the trace."""
        best = self.rerank(beams, agreement, plan, fluency)
        caption = beams[best][1] if plan is None or not plan.prefix else agree_in_number(beams[best][1], self.MASS)
        caption = tidy(caption, self.table.singular)
        if plan is None:
            return CaptionChoice(caption, 0.0, False, agreement[best])
        trace = list(plan.trace)
        plain = self.rerank(beams, agreement, plan) if fluency is not None else best
        if plain != best:
            trace.append(f"fluency: '{beams[best][1]}' over '{beams[plain][1]}'")
        if first_choice is not None and first_choice != caption:
            trace.append(f"'{first_choice}' -> '{caption}'")
        caption = self._trim(plan, caption, trace)
        confidence, sure = self._sureness(plan, caption, agreement[best])
        top = plan.pooled.topk(5)
        named = [(self.table.words[i].text, float(p)) for p, i in zip(top.values, top.indices)]
        spot = self._place(plan, caption) if not sure and self.config.caption_place_when_unsure else None
        if spot is None:
            people = names_person(caption) or self.evidence.supported(plan, "person")
            return CaptionChoice(caption, confidence, sure, agreement[best], named, trace, people)
        trace.append(f"place: nothing vouches for the caption's {subject_group(caption)}: '{spot}'")
        things = [self.table.words[self.table.index[w]] for w, p in named if p >= PLACE_THINGS]
        also = [w.text for w in things if not set(w.classes) <= set(ANIMAL_CLASSES) and w.text not in
                self.table.settings and not names(spot, w)]
        # the caption's subject was a guess, and so is a person the clothes classes barely suggest: a story of "A
        # railing." must not fill the place with people
        return CaptionChoice(spot, self._sureness(plan, spot, agreement[best])[0], False, agreement[best], named,
                             trace, names_person(spot), also)

    def _sureness(self, plan: CaptionPlan, caption: str, agreement: float) -> tuple[float, bool]:
        """The classifier's confidence in what the caption names, and whether anything vouches for its subject."""
        said = words(caption)  # tokenized once for the ~750 words of the table
        vouched = [float(plan.pooled[i]) for i, w in enumerate(self.table.words) if names(said, w)]
        confidence = max(vouched, default=0.0)
        group = subject_group(caption)
        sure = (confidence >= max(self.config.caption_hedge, 1e-9) or agreement >= self.config.caption_hedge_agreement
                or (group is not None and self.evidence.supported(plan, group)))
        return confidence, bool(sure)

    def _place(self, plan: CaptionPlan, caption: str) -> str | None:
        """Step 7: an unsure caption's unsupported animal subject goes, and its place is what is said (None: the
        caption stays, its subject a person, or no place it names is one the classifier allows)."""
        group = subject_group(caption)
        if group in (None, "person"):
            return None
        spot = place(caption, caption_subject(caption))
        return spot if spot is not None and all(self.evidence.seen(plan, word) for word in words(spot)) else None

    def _trim(self, plan: CaptionPlan, caption: str, trace: list[str]) -> str:
        """Step 6: the caption without the phrases that name what the classifier does not see, after a forced word."""
        if self.config.caption_trim <= 0 or not plan.opening or not caption.lower().startswith(plan.opening.lower()):
            return caption
        # a thing acts only where the decoder made a person of it ("A moped policeman is riding ...")
        subject = caption.split(" is ")[0].split(" are ")[0]
        thing = not self.evidence.wearer(plan.opening) and not names_person(subject)
        trimmed, dropped = trim(caption, len(plan.opening.split()), lambda word: not self.evidence.seen(plan, word),
                                thing=thing)
        if dropped:
            trace.append(f"trim: unseen {', '.join(repr(d) for d in dropped)}: '{trimmed}'")
        return trimmed
