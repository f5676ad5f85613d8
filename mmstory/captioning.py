"""Where a caption comes from: the caption decoder's beams (or the writer through the bridge), their agreement with
the image under the contrastive heads, and the image classifier's probabilities, handed to the caption policy
(`mmstory.caption_policy`, which decides). Mixed into StoryModel; kept here so the model file shows the
architecture and this one the captioning.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from mmstory import caption_search
from mmstory.caption_policy import CaptionChoice, CaptionPolicy
from mmstory.components import similarity
from mmstory.imagenet_words import imagenet_words
from mmstory.open_vocabulary import creature_forms, word_forms

# the one repetition penalty every captioning call site uses (the CLI, the API, the story, the answer, evaluation):
# beam search without it repeats a phrase ("a dog and a dog")
CAPTION_REPETITION_PENALTY = 1.2


class ImageWordsMixin:
    """The vision backbone's ImageNet classes as words: the caption decoder's tags, the caption policy's word table,
    and the class names the story writer may use beside a caption."""

    def top_classes(self, image_pooled: torch.Tensor) -> torch.Tensor:
        """[B, image_tags]: the vision backbone's most probable ImageNet classes, most probable first."""
        with torch.no_grad():
            logits = self.vision.class_logits(image_pooled.float())
        return logits.topk(self.config.caption_decoder.image_tags, dim=-1).indices

    def image_tags(self, image_pooled: torch.Tensor | None, classes: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
        """The caption decoder's tag words for each image: the names of the vision backbone's top ImageNet classes
        (or of `classes`, [B, image_tags], as training's novel-object swaps give them), in its compact vocabulary
        ([B, image_tags x tag_tokens], PAD where a name is shorter or out of vocabulary)."""
        c = self.config.caption_decoder
        if self.caption_decoder is None or not c.image_tags:
            return None
        if classes is None and image_pooled is None:
            raise ValueError("this model's caption decoder reads image tags: pass image_pooled with image_tokens")
        top = self.top_classes(image_pooled) if classes is None else classes
        decoder = self.caption_decoder
        tags = decoder.compact_table()[self._class_tokens[top.cpu()]].flatten(1)  # -1 padding -> PAD
        return tags.masked_fill(tags == decoder.UNK, decoder.PAD).to(top.device)  # unknown words: empty

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

    def caption_policy(self, rerank: float | None = None, concepts: float | None = None) -> CaptionPolicy:
        """The caption policy for this model's generation config (rerank / concepts: one call's overrides), with the
        ImageNet words as compact ids: the fitted vocabulary's, plus the added open vocabulary when
        `caption_open_vocabulary` is on (built once per fitted vocabulary)."""
        config = self.generation_config
        config = dataclasses.replace(config, caption_rerank=config.caption_rerank if rerank is None else rerank,
                                     caption_concepts=config.caption_concepts if concepts is None else concepts)
        decoder, table = self.caption_decoder, imagenet_words()
        key = (None if decoder is None else decoder.compact_table(), config.caption_open_vocabulary)
        if getattr(self, "_caption_forms_key", None) != key:
            forms, creatures = {}, {}
            if decoder is not None and self._has_imagenet_classifier():
                forms = word_forms(decoder, self.tokenizer, table, open_vocabulary=config.caption_open_vocabulary)
                creatures = creature_forms(decoder, self.tokenizer)
            self._caption_forms, self._creature_forms, self._caption_forms_key = forms, creatures, key
        return CaptionPolicy(config, table, self._caption_forms, opening=self._caption_opening,
                             creatures=self._creature_forms)

    def _caption_opening(self, word: str) -> tuple[int, ...]:
        """The compact ids of a caption's first word, as the training captions tokenize it ("A", "An", "Some")."""
        return tuple(self.caption_decoder.to_compact(self.tokenize_captions([word]))[0])

    def _has_imagenet_classifier(self) -> bool:
        try:
            return self.vision._classifier().out_features == 1000
        except ValueError:
            return False


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
        compact = caption_search.sample(dec, image_tokens.float(), num_samples, temperature,
                                        self.config.max_caption_tokens, self.image_tags(image_pooled), generator)
        return compact, self._decode_compact(compact)

    def _decode_compact(self, compact: list[list[int]]) -> list[str]:
        """Caption-decoder ids (compact vocabulary) -> text."""
        texts = self.tokenizer.batch_decode(self.caption_decoder.to_tokenizer(compact), skip_special_tokens=True)
        return [t.strip() for t in texts]

    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor | None = None, **kwargs) -> list[str]:
        """One caption per image, batched; the keywords are `caption_choices`'."""
        return [choice.caption for choice in self.caption_choices(pixel_values, **kwargs)]

    @torch.no_grad()
    def caption_choices(self, pixel_values: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None,
                        image_pooled: torch.Tensor | None = None, max_new_tokens: int | None = None,
                        num_beams: int | None = None, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                        captioner: str | None = None, rerank: float | None = None,
                        concepts: float | None = None) -> list[CaptionChoice]:
        """One caption per image with how sure it is and the trace of `mmstory.caption_policy`'s steps.

        The caption decoder's beams go through the policy: `rerank` (default: the generation config's
        `caption_rerank`) weighs the image-caption agreement against the log-probability; `concepts` (default:
        `caption_concepts`) is the pooled classifier confidence at which a word must be written. The writer path
        (`captioner='writer'`) writes one caption through the bridge, with no policy."""
        if image_tokens is None:
            image_tokens, image_pooled = self.encode_image(pixel_values)
        captioner = captioner or self.generation_config.captioner
        max_new_tokens = max_new_tokens or self.config.max_caption_tokens
        num_beams = self.generation_config.caption_beams if num_beams is None else num_beams
        if captioner != "caption_decoder":
            return [CaptionChoice(c, 0.0, False) for c in self._writer_captions(image_tokens, image_pooled,
                                                                                max_new_tokens, num_beams,
                                                                                repetition_penalty, length_penalty)]
        decoder = self.caption_decoder
        if decoder is None:
            raise ValueError("this model has no caption decoder; use captioner='writer'")
        policy = self.caption_policy(rerank, concepts)
        plans = None
        if image_pooled is not None and self._has_imagenet_classifier():
            plans = policy.plan(self.vision.class_logits(image_pooled.float()).softmax(-1).cpu())
        tags = self.image_tags(image_pooled)
        if num_beams == 1:
            compact = caption_search.greedy(decoder, image_tokens.float(), max_new_tokens, repetition_penalty, tags)
            return [CaptionChoice(tidy_caption(t), 0.0, False) for t in self._decode_compact(compact)]
        bias = None if plans is None else policy.logit_bias(plans, decoder.size, decoder.base_size)
        bias = None if bias is None else bias.to(image_tokens.device)

        def search(rows: list[int]) -> list[list[tuple[float, str]]]:
            """Beam search for these images (with their plans' prefix and required word), with agreements."""
            index = torch.tensor(rows, device=image_tokens.device)
            found = caption_search.candidates(
                decoder, image_tokens[index].float(), max_new_tokens, num_beams, length_penalty, repetition_penalty,
                None if tags is None else tags[index], None if plans is None else [plans[i].required for i in rows],
                None if bias is None else bias[index], None if plans is None else [plans[i].prefix for i in rows])
            return [[(lp, tidy_caption(t)) for lp, t in zip([lp for lp, _ in beams],
                                                            self._decode_compact([ids for _, ids in beams]))]
                    for beams in found]

        def agreements(rows: list[int], beams: list[list[tuple[float, str]]]) -> list[list[float]]:
            if policy.config.caption_rerank <= 0 or image_pooled is None:
                return [[0.0] * len(b) for b in beams]
            flat = self.caption_agreement([t for b in beams for _, t in b], image_pooled[rows])
            out, start = [], 0
            for k, b in enumerate(beams):
                out.append(flat[start: start + len(b), k].tolist())
                start += len(b)
            return out

        everyone = list(range(image_tokens.shape[0]))
        beams = search(everyone)
        scores = agreements(everyone, beams)
        first = [b[policy.rerank(b, a, None if plans is None else plans[i])][1]
                 for i, (b, a) in enumerate(zip(beams, scores))]
        if plans is not None:
            again = [i for i in everyone if policy.revise(plans[i], first[i], max(scores[i], default=0.0))]
            if again:
                bias = policy.ban_rejected(plans, bias, decoder.size)
                bias = None if bias is None else bias.to(image_tokens.device)
                redone = search(again)
                for i, b, a in zip(again, redone, agreements(again, redone)):
                    beams[i], scores[i] = b, a
        # the writer weighs in last, on the wording of what the policy settled (not on what it decides)
        fluent: list[list[float] | None] = [None] * len(everyone)
        if policy.config.caption_fluency > 0:
            flat, start = self.caption_fluency([t for b in beams for _, t in b]), 0
            for i, b in enumerate(beams):
                fluent[i], start = flat[start: start + len(b)], start + len(b)
        return [policy.choose(None if plans is None else plans[i], beams[i], scores[i], first[i], fluent[i])
                for i in everyone]

    @torch.no_grad()
    def caption_fluency(self, captions: list[str]) -> list[float]:
        """Each caption's log-probability under the story writer (plain text after its beginning-of-text token),
        divided by the square root of its token count: the caption decoder learnt its English from 30,000 captions,
        the writer from far more. A per-token mean would reward padding a caption with likely words ("... in the air
        on a track"), a plain sum the shortest caption."""
        if not captions:
            return []
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        rows = [[start, *self.tokenizer(c, add_special_tokens=False).input_ids] for c in captions]
        width = max(map(len, rows))
        device = self.writer.get_input_embeddings().weight.device
        ids = torch.tensor([r + [start] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logprobs = self.writer(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        taken = logprobs.gather(2, ids[:, 1:, None])[..., 0] * mask[:, 1:]
        return (taken.sum(1) / mask[:, 1:].sum(1).clamp(min=1).sqrt()).tolist()

    def _writer_captions(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor | None, max_new_tokens: int,
                         num_beams: int, repetition_penalty: float, length_penalty: float) -> list[str]:
        """Captions from the story LM through the bridge (the `captioner='writer'` path)."""
        prefix = self.visual_prefix(image_tokens, image_pooled)
        prompt = self.caption_prompt()
        embeds = torch.stack([self.prompt_embeddings(prompt, [p]) for p in prefix])
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.writer.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, do_sample=False, repetition_penalty=repetition_penalty,
                                   length_penalty=length_penalty, pad_token_id=self.tokenizer.pad_token_id)
        return [tidy_caption(t) for t in self.tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)]

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


def tidy_caption(text: str) -> str:
    """Reattach the clitics the crowd captions detach ('the cat 's face' -> "the cat's face"); metrics re-split them
    with the PTB tokenizer, so scores do not change."""
    return re.sub(r"\s+('s|'re|n't)\b", r"\1", text.strip())
