"""How StoryModel captions: the caption decoder's beams reranked by image-caption agreement, with distractor images
and the image classifier's words (the ImageNet lexicon). Mixed into StoryModel; kept here so the model file shows
the architecture and this one the captioning heuristics.
"""

from __future__ import annotations

import re

import torch

from mmstory.components import similarity
from mmstory.text import CREATURE_GROUPS, OBJECT_FORMS, words

CONCEPT_VOCABULARY = 2000  # concept words come from the caption decoder's this many most frequent tokens
# the one repetition penalty every captioning call site uses (the CLI, the API, the story, the answer, evaluation):
# beam search without it repeats a phrase ("a dog and a dog")
CAPTION_REPETITION_PENALTY = 1.2
# ImageNet-1k's standard order: its animals come first; dogs and house cats are the ones people are photographed with
ANIMAL_CLASSES, DOG_CLASSES, HOUSE_CAT_CLASSES = range(0, 398), range(151, 269), range(281, 286)
# the classifier's whole mass on animals below which a captioned animal is taken to be the caption data's habit
UNSUPPORTED_ANIMAL = 0.05


class ImageWordsMixin:
    """The vision backbone's ImageNet classes as words: the caption decoder's tags and its required concept word,
    and the class names the story writer may use beside a caption."""

    def image_tags(self, image_pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The caption decoder's tag words for each image: the names of the vision backbone's top ImageNet classes,
        in its compact vocabulary ([B, image_tags x tag_tokens], PAD where a name is shorter or out of vocabulary)."""
        c = self.config.caption_decoder
        if self.caption_decoder is None or not c.image_tags:
            return None
        if image_pooled is None:
            raise ValueError("this model's caption decoder reads image tags: pass image_pooled with image_tokens")
        with torch.no_grad():
            top = self.vision.class_logits(image_pooled.float()).topk(c.image_tags, dim=-1).indices  # [B, k]
        decoder = self.caption_decoder
        tags = decoder.compact_table()[self._class_tokens[top.cpu()]].flatten(1)  # -1 padding -> PAD
        return tags.masked_fill(tags == decoder.UNK, decoder.PAD).to(image_pooled.device)  # unknown words: empty

    def concept_words(self, image_pooled: torch.Tensor, threshold: float) -> list[tuple[int, ...] | None]:
        """Per image, the caption decoder's compact ids of the word its caption must contain (singular or plural),
        or None: the head noun (last word) of the backbone's top ImageNet class, when the classifier gives that class
        at least `threshold`. Novel-object captioning with a tagger's words as constraints (Anderson et al., 2017):
        the classifier knows a thousand classes; the caption data shows cats in 17 of Flickr8k's 6,000 images."""
        if self.caption_decoder is None:
            raise ValueError("concept words constrain the caption decoder; this model has none")
        confidence, top = self.vision.class_logits(image_pooled.float()).softmax(-1).max(-1)
        words = self._class_words()[top.cpu()].tolist()
        return [tuple(w for w in forms if w >= 0) if c >= threshold and forms[0] >= 0 else None
                for c, forms in zip(confidence.tolist(), words)]

    def sure_classes(self, image_pooled: torch.Tensor, threshold: float) -> list[list[str]]:
        """Per image, the names of the ImageNet classes the backbone gives at least `threshold` (none at 0, or when
        it has no classifier): what the story writer may name beside the caption ("Also seen: tabby cat")."""
        if threshold <= 0:
            return [[] for _ in range(image_pooled.shape[0])]
        try:
            probs = self.vision.class_logits(image_pooled.float()).softmax(-1)
        except ValueError:
            return [[] for _ in range(image_pooled.shape[0])]
        names = self.vision.class_names()
        return [[names[i].lower() for i in (row >= threshold).nonzero().flatten().tolist()] for row in probs]

    def _class_words(self) -> torch.Tensor:
        """Class -> [compact id of the word, of its plural] (-1 where there is none). The word: the head noun of
        the class's first name whose head noun is a single token among the caption decoder's CONCEPT_VOCABULARY
        most frequent, so one the training captions use often enough to write around. Rebuilt with the decoder's
        compact table, i.e. when the fitted vocabulary changes."""
        decoder = self.caption_decoder
        table = decoder.compact_table()
        if getattr(self, "_class_words_source", None) is not table:

            def compact(word: str) -> int:
                ids = self.tokenizer(" " + word, add_special_tokens=False).input_ids
                rank = int(table[ids[0]]) if len(ids) == 1 else -1
                return rank if decoder.SPECIALS <= rank < decoder.SPECIALS + CONCEPT_VOCABULARY else -1

            words = []
            for synonyms in self.vision.class_synonyms():
                head = next((name.split()[-1] for name in synonyms if compact(name.split()[-1]) >= 0), None)
                words.append([compact(head), compact(head + "s")] if head else [-1, -1])
            self._class_words_table, self._class_words_source = torch.tensor(words, dtype=torch.long), table
        return self._class_words_table


class CaptioningMixin:
    """Captions from the configured path (the caption decoder or the LM through the bridge), and the agreement
    scores that rerank them."""

    @torch.no_grad()
    def sample_captions(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor | None, num_samples: int,
                        temperature: float = 1.0, generator: torch.Generator | None = None
                        ) -> tuple[list[list[int]], list[str]]:
        """`num_samples` caption-decoder samples per image: (compact ids, texts), image-major."""
        dec = self.caption_decoder
        if dec is None:
            raise ValueError("this model has no caption decoder")
        compact = dec.sample(image_tokens.float(), num_samples, temperature, self.config.max_caption_tokens,
                             self.image_tags(image_pooled), generator)
        return compact, self._decode_compact(compact)

    def _decode_compact(self, compact: list[list[int]]) -> list[str]:
        """Caption-decoder ids (compact vocabulary) -> text."""
        texts = self.tokenizer.batch_decode(self.caption_decoder.to_tokenizer(compact), skip_special_tokens=True)
        return [t.strip() for t in texts]

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None,
                          image_pooled: torch.Tensor | None = None, max_new_tokens: int | None = None,
                          num_beams: int | None = None, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                          captioner: str | None = None, rerank: float | None = None,
                          concepts: float | None = None) -> list[str]:
        """One caption per image, batched, from the configured captioning path.

        `rerank` (default: the generation config's `caption_rerank`) > 0 picks, among the caption decoder's beams, the
        one with the best log-probability + rerank x cosine agreement with the image under the contrastive head: beam
        search alone favours the captions most common in the training data over the ones specific to the picture.
        With distractors (`caption_distractors`) the cosine is taken relative to the training images' (log p(image |
        caption), over the temperature), so that a caption as true of many other pictures does not win.
        `concepts` (default: the generation config's `caption_concepts`) > 0 makes the caption decoder's beam search
        write the word of a class the image classifier is that sure of (`concept_words`).
        """
        if image_tokens is None:
            image_tokens, image_pooled = self.encode_image(pixel_values)
        captioner = captioner or self.generation_config.captioner
        max_new_tokens = max_new_tokens or self.config.max_caption_tokens
        rerank = self.generation_config.caption_rerank if rerank is None else rerank
        num_beams = self.generation_config.caption_beams if num_beams is None else num_beams
        concepts = self.generation_config.caption_concepts if concepts is None else concepts
        checked = self._class_check(image_pooled)
        if captioner == "caption_decoder":
            if self.caption_decoder is None:
                raise ValueError("this model has no caption decoder; use captioner='writer'")
            required = None
            if concepts > 0 and num_beams > 1 and image_pooled is not None:
                required = self.concept_words(image_pooled, concepts)
            if rerank > 0 and num_beams > 1 and image_pooled is not None:
                return self._checked(self._reranked_captions(image_tokens, image_pooled, max_new_tokens, num_beams,
                                                             length_penalty, repetition_penalty, rerank, required,
                                                             checked),
                                     checked)
            compact = self.caption_decoder.generate(image_tokens.float(), max_new_tokens, num_beams, length_penalty,
                                                    repetition_penalty, self.image_tags(image_pooled), required)
            ids = self.caption_decoder.to_tokenizer(compact)
        else:
            prefix = self.visual_prefix(image_tokens, image_pooled)
            prompt = self.caption_prompt()
            embeds = torch.stack([self.prompt_embeddings(prompt, [p]) for p in prefix])
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.writer.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        num_beams=num_beams, do_sample=False, repetition_penalty=repetition_penalty,
                                        length_penalty=length_penalty, pad_token_id=self.tokenizer.pad_token_id)
            ids = out.tolist()
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return self._checked([tidy_caption(t) for t in texts], checked)

    def _class_check(self, image_pooled: torch.Tensor | None) -> tuple[torch.Tensor, list[list[str]]] | None:
        """(class probabilities [B, 1000], class names) for the generation config's `caption_class_check`, or None
        when it is off, no pooled features are given or the backbone has no ImageNet-1k classifier."""
        if self.generation_config.caption_class_check <= 0 or image_pooled is None:
            return None
        try:
            return self.vision.class_logits(image_pooled.float()).softmax(-1).cpu(), self.vision.class_synonyms()
        except ValueError:
            return None

    def _checked(self, captions: list[str], checked: tuple[torch.Tensor, list[list[str]]] | None) -> list[str]:
        """The captions after `agree_with_classifier` (`checked`: from `_class_check`)."""
        if checked is None:
            return captions
        probs, synonyms = checked
        threshold = self.generation_config.caption_class_check
        return [agree_with_classifier(c, row, synonyms, threshold) for c, row in zip(captions, probs)]

    def _reranked_captions(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor, max_new_tokens: int,
                           num_beams: int, length_penalty: float, repetition_penalty: float,
                           weight: float, required: list[tuple[int, ...] | None] | None = None,
                           checked: tuple[torch.Tensor, list[list[str]]] | None = None) -> list[str]:
        found = self.caption_decoder.candidates(image_tokens.float(), max_new_tokens, num_beams, length_penalty,
                                                repetition_penalty, self.image_tags(image_pooled), required)
        texts = [self._decode_compact([ids for _, ids in rows]) for rows in found]
        flat = [t for rows in texts for t in rows]
        agreement = self.caption_agreement(flat, image_pooled)
        kinds = sure_animal_kinds(checked, self.generation_config.caption_class_check, len(found))
        chosen, start = [], 0
        for image, rows in enumerate(found):
            scores = [logprob + weight * float(agreement[start + j, image]) for j, (logprob, _) in enumerate(rows)]
            # a beam whose subject is the sure animal beats one that puts a person before it
            first = [kinds[image] is not None and subject_group(t) in kinds[image] for t in texts[image]]
            chosen.append(texts[image][max(range(len(rows)), key=lambda j: (first[j], scores[j]))])
            start += len(rows)
        return [tidy_caption(t) for t in chosen]

    def caption_agreement(self, captions: list[str], image_pooled: torch.Tensor) -> torch.Tensor:
        """[captions, images] agreement for caption reranking: the cosine under the contrastive head, less (with
        distractors) logsumexp over the distractor images' logits / scale, i.e. log p(image | caption) / scale among
        the training images, which a caption as true of many of them does not win."""
        embedded = self.text_embedding(captions)
        agreement = similarity(embedded, self.image_embedding(image_pooled))
        if self.has_distractors():
            scale = self.contrastive_scale()
            logits = scale * embedded @ self._distractor_embeddings().T
            agreement = agreement - (torch.logsumexp(logits, dim=1) / scale)[:, None]
        return agreement

    def _distractor_embeddings(self) -> torch.Tensor:
        """The distractors in the shared space, computed once per state of the weights and buffer (not per call)."""
        weight, bank = self.image_projection.weight, self.distractor_pooled
        key = (weight.data_ptr(), weight._version, bank.data_ptr(), bank._version, torch.is_grad_enabled())
        if getattr(self, "_distractor_cache", (None,))[0] != key:
            self._distractor_cache = (key, self.image_embedding(bank))
        return self._distractor_cache[1]

    def has_distractors(self) -> bool:
        return hasattr(self, "distractor_pooled") and bool(self.distractor_pooled.any())

    @torch.no_grad()
    def set_distractors(self, pooled: torch.Tensor) -> None:
        """Keep these training images' pooled features: at most `caption_distractors` rows (fewer shrink it)."""
        if not self.config.caption_distractors:
            raise ValueError("this model keeps no distractors (caption_distractors is 0)")
        pooled = pooled[: self.config.caption_distractors].float()
        if len(pooled) == 0:
            raise ValueError("no distractor images given")
        if len(pooled) < self.config.caption_distractors:
            self.config.caption_distractors = len(pooled)
        self.distractor_pooled = pooled.to(self.logit_scale.device).clone()

    @torch.no_grad()
    def caption_log_likelihood(self, image_tokens: torch.Tensor, captions: list[str],
                               image_pooled: torch.Tensor | None = None) -> torch.Tensor:
        """log p(caption | image) under the caption decoder, summed over tokens, one per (image, caption) row:
        CoCa's captioning objective read as an image-text matching score."""
        if self.caption_decoder is None:
            raise ValueError("this model has no caption decoder")
        ids, padding = self._caption_decoder_batch(captions, image_tokens.device)
        logprobs, real = self._token_logprobs(ids, padding, image_tokens, image_pooled)
        return (logprobs * real).sum(dim=1)

    def _token_logprobs(self, ids: torch.Tensor, padding: torch.Tensor, image_tokens: torch.Tensor,
                        image_pooled: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(token | image, earlier tokens) under the caption decoder for rows from `_compact_batch` ([N, T-1],
        BOS excluded), and the mask of real tokens (EOS included)."""
        logits = self.caption_decoder(ids, image_tokens.float(), padding, self.image_tags(image_pooled)).float()
        return logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0], ~padding[:, 1:]


def class_kind(index: int, synonyms: list[str]) -> set[str]:
    """What a caption may call this class's creature: its object group ('dog' for a Shih-Tzu) and its own words."""
    kind = {w for name in synonyms for w in words(name)}
    if index in DOG_CLASSES:
        kind.add("dog")
    elif index in HOUSE_CAT_CLASSES:
        kind.add("cat")
    return kind | {OBJECT_FORMS[w] for w in kind if w in OBJECT_FORMS}


def sure_animal_kinds(checked: tuple[torch.Tensor, list[list[str]]] | None, threshold: float,
                      images: int) -> list[set[str] | None]:
    """Per image, `class_kind` of the animal class the classifier is at least `threshold` sure of, or None."""
    if checked is None:
        return [None] * images
    probs, synonyms = checked
    confidence, index = probs.max(dim=-1)
    return [class_kind(i, synonyms[i]) if c >= threshold and i in ANIMAL_CLASSES else None
            for c, i in zip(confidence.tolist(), index.tolist())]


def caption_subject(caption: str) -> int | None:
    """The index (in `caption.split()`) of the caption's subject: its first person or animal word among the first
    eight ("A black and white dog is ..." -> 4), or None."""
    for i, token in enumerate(caption.split()[:8]):
        found = words(token)
        if found and OBJECT_FORMS.get(found[0]) in CREATURE_GROUPS:
            return i
    return None


def subject_group(caption: str) -> str | None:
    """The object group of the caption's subject ('person', 'dog', ...), or None."""
    subject = caption_subject(caption)
    return None if subject is None else OBJECT_FORMS[words(caption.split()[subject])[0]]


def agree_with_classifier(caption: str, probs: torch.Tensor, synonyms: list[list[str]], threshold: float) -> str:
    """The caption, or, when the image classifier is at least `threshold` sure of a class the caption contradicts,
    the caption told about that class.

    Trained on Flickr8k, the caption decoder sees people and dogs everywhere; on other photos the ImageNet classifier
    knows better (a cheetah captioned "A little boy is standing in the water."). A sure animal class that the caption
    does not name takes the place of the caption's subject ("A cheetah is standing in the water."), unless that
    subject is a person beside a dog or a cat, which people are photographed with. A sure object class replaces a
    captioned animal the classifier gives almost no weight to ("A brown dog is sitting on the floor." for an
    espresso becomes "An espresso.").
    """
    if threshold <= 0 or not caption.strip():
        return caption
    confidence, index = (float(v) for v in probs.max(dim=-1))
    index = int(index)
    if confidence < threshold:
        return caption
    subject = caption_subject(caption)
    if subject is None:
        return caption
    tokens = caption.split()
    name = synonyms[index][0]
    article = "An" if name[:1].lower() in "aeiou" else "A"
    group = OBJECT_FORMS[words(tokens[subject])[0]]
    if index in ANIMAL_CLASSES:
        kind = class_kind(index, synonyms[index])
        said = words(caption)
        named = set(said) | {OBJECT_FORMS[w] for w in said if w in OBJECT_FORMS}
        if named & kind or (group == "person" and (index in DOG_CLASSES or index in HOUSE_CAT_CLASSES)):
            return caption
        rest = tokens[subject + 1:]
        if rest and rest[0] == "are":
            rest[0] = "is"
        return " ".join([article, name, *rest])
    if group != "person" and float(probs[ANIMAL_CLASSES.start: ANIMAL_CLASSES.stop].sum()) < UNSUPPORTED_ANIMAL:
        return f"{article} {name}."
    return caption


def tidy_caption(text: str) -> str:
    """Reattach the clitics the crowd captions detach ('the cat 's face' -> "the cat's face"); metrics re-split them
    with the PTB tokenizer, so scores do not change."""
    return re.sub(r"\s+('s|'re|n't)\b", r"\1", text.strip())
