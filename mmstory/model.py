"""StoryModel: the CoCa-style image-text model, readable top to bottom.

    image -> VisionEncoder -> tokens [B,N,Dv], pooled [B,Dp]
        pooled -> image_projection -> shared space <- text_projection <- TextEncoder <- caption   (InfoNCE)
        tokens -> bridge -> visual prefix [B,K,Dd] -> causal LM over [prefix, prompt, caption]    (caption CE)
        tokens -> caption_decoder (optional, CoCa's own small multimodal decoder)                 (caption CE)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmstory.components import CaptionDecoder, MLPBridge, ProjectionHead, ResamplerBridge, TextEncoder, VisionEncoder
from mmstory.config import ModelConfig, PartConfig
from mmstory.losses import IGNORE_INDEX, caption_loss, contrastive_loss, self_critical_loss
from mmstory.prompts import IMAGE_PLACEHOLDER
from mmstory.registry import resolve_pretrained
from mmstory.specs import is_reproducible, load_decoder, load_text_encoder, load_vision

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's own file names, for the story writer's LoRA
ADAPTER_CONFIG_NAME = "adapter_config.json"
CAPTION_SYSTEM = "You describe photographs accurately in one short sentence."
CONCEPT_VOCABULARY = 2000  # concept words come from the caption decoder's this many most frequent tokens


@dataclass
class StoryModelOutput:
    loss: torch.Tensor
    contrastive_loss: torch.Tensor | None = None
    caption_loss: torch.Tensor | None = None
    caption_decoder_loss: torch.Tensor | None = None


class StoryModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(*load_vision(config.vision.spec, config.vision.pretrained))
        text_model, self.text_tokenizer = load_text_encoder(config.text.spec, config.text.pretrained)
        self.text = TextEncoder(text_model)
        self.decoder, self.tokenizer = load_decoder(config.decoder.spec, config.decoder.pretrained)
        self.tokenizer.padding_side = "right"
        hidden = self.decoder.config.hidden_size

        heads = config.contrastive_heads
        self.image_projection = nn.Linear(self.vision.pooled_dim, heads * config.embed_dim, bias=False)
        self.text_projection = ProjectionHead(self.text.dim, config.embed_dim, config.text_head_hidden, groups=heads)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        if config.caption_distractors:  # training images' pooled features; zero until `set_distractors`
            self.register_buffer("distractor_pooled", torch.zeros(config.caption_distractors, self.vision.pooled_dim))
        b = config.bridge
        if b.kind == "resampler":
            self.bridge = ResamplerBridge(self.vision.token_dim, self.vision.num_tokens, hidden, b.num_queries,
                                          b.width, b.depth, b.heads, b.dropout)
        else:
            self.bridge = MLPBridge(self.vision.pooled_dim, hidden, b.num_queries, b.width)
        self.caption_decoder = None
        if config.caption_decoder.enabled:
            c = config.caption_decoder
            self.caption_decoder = CaptionDecoder(len(self.tokenizer), c.vocab_size, self.vision.token_dim, c.width,
                                                  c.depth, c.heads, c.max_length, c.dropout,
                                                  tag_slots=c.image_tags * c.tag_tokens)
            if c.image_tags:  # tokenizer ids of each class name, -1 padded: [classes, tag_tokens]
                names = self.tokenizer([" " + n for n in self.vision.class_names()], add_special_tokens=False)
                self._class_tokens = torch.tensor([(ids + [-1] * c.tag_tokens)[: c.tag_tokens]
                                                   for ids in names.input_ids], dtype=torch.long)
        for part in ("vision", "text", "decoder"):
            self._set_train_mode(part, getattr(config, part))

    # --- freezing / LoRA -------------------------------------------------------------------------------------------
    def _backbone(self, part: str) -> nn.Module:
        return self.decoder if part == "decoder" else getattr(self, part).model

    def _set_train_mode(self, part: str, cfg: PartConfig) -> None:
        module = self._backbone(part)
        if cfg.train == "full":
            module.requires_grad_(True)
            return
        module.requires_grad_(False)
        if cfg.train == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            targets = cfg.lora_targets or _default_lora_targets(module)
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets)
            inject_adapter_in_model(lora, module)
            for name, param in module.named_parameters():
                param.requires_grad_("lora_" in name)

    def configure_part(self, part: str, cfg: PartConfig) -> None:
        """Change how a loaded part trains, e.g. give a pretrained model's writer LoRA adapters to fine-tune."""
        setattr(self.config, part, cfg)
        self._set_train_mode(part, cfg)

    def train(self, mode: bool = True) -> StoryModel:
        """Frozen backbones stay in eval mode (fixed batch-norm statistics, no dropout) while the rest trains."""
        super().train(mode)
        for part in ("vision", "text", "decoder"):
            if getattr(self.config, part).train == "frozen":
                self._backbone(part).eval()
        return self

    # --- encoders --------------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial tokens and pooled vector; no graph through a frozen encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.vision.train != "frozen"):
            return self.vision(pixel_values)

    def contrastive_scale(self) -> torch.Tensor:
        """1 / temperature of the contrastive head, capped at 100 as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def _shared_space(self, projected: torch.Tensor) -> torch.Tensor:
        """Each contrastive head's output L2-normalised, the heads concatenated and scaled by 1/sqrt(heads): a unit
        vector whose dot product with another is the mean of the heads' cosines, so one matrix product scores with
        the whole ensemble (and a single head is plain CLIP)."""
        heads = self.config.contrastive_heads
        unit = F.normalize(projected.unflatten(-1, (heads, self.config.embed_dim)), dim=-1)
        return unit.flatten(-2) / math.sqrt(heads)

    def image_embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._shared_space(self.image_projection(pooled.float()))

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Pooled text-encoder features [B, Dt] (before projection); no graph through a frozen encoder."""
        device = self.logit_scale.device
        batch = self.text_tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.text.train != "frozen"):
            return self.text(batch.input_ids.to(device), batch.attention_mask.to(device))

    def text_embedding(self, texts: list[str] | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings in the shared space, from texts or cached pooled features."""
        pooled = self.encode_text(texts) if pooled is None else pooled
        return self._shared_space(self.text_projection(pooled.float()))

    def visual_prefix(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.bridge(tokens, pooled).to(self.decoder.dtype)

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

    # --- prompts ---------------------------------------------------------------------------------------------------
    def format_prompt(self, user_text: str, system: str | None = None) -> str:
        """Wrap a user message in the decoder's chat template (when it has one), ready for the answer."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user_text}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return (f"{system}\n" if system else "") + f"{user_text}\n"

    def prompt_embeddings(self, prompt: str, prefixes: list[torch.Tensor]) -> torch.Tensor:
        """Embed a prompt whose IMAGE_PLACEHOLDERs are replaced, in order, by visual prefixes [K, D]: -> [L, D]."""
        pieces = prompt.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(prefixes):
            raise ValueError(f"prompt has {len(pieces) - 1} image placeholders but {len(prefixes)} images were given")
        embed = self.decoder.get_input_embeddings()
        device = embed.weight.device
        parts = []
        for i, piece in enumerate(pieces):
            if piece:
                ids = self.tokenizer(piece, add_special_tokens=False, return_tensors="pt").input_ids[0].to(device)
                parts.append(embed(ids))
            if i < len(prefixes):
                parts.append(prefixes[i].to(embed.weight.dtype))
        return torch.cat(parts, dim=0)

    def caption_prompt(self) -> str:
        return self.format_prompt(f"{IMAGE_PLACEHOLDER}\n{self.config.caption_prompt}", system=CAPTION_SYSTEM)

    # --- training --------------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | None = None, captions: list[str] | None = None, *,
                image_tokens: torch.Tensor | None = None, image_pooled: torch.Tensor | None = None,
                text_pooled: torch.Tensor | None = None, caption_samples: list[list[int]] | None = None,
                sample_advantages: torch.Tensor | None = None) -> StoryModelOutput:
        """Losses for a batch of (image, caption) pairs; pass pixels or cached encoder features (image and text).

        Self-critical training passes the caption decoder's own `caption_samples` (compact ids, one per image row)
        with their `sample_advantages` instead of captions: the caption decoder's loss is then the policy gradient
        (`mmstory.losses.self_critical_loss`) and the other heads, which need reference captions, must be off.
        """
        if caption_samples is not None:
            return self._self_critical(caption_samples, sample_advantages, pixel_values, image_tokens, image_pooled)
        if captions is None:
            raise ValueError("captions are required to compute the training losses")
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or cached image_tokens/image_pooled")
            image_tokens, image_pooled = self.encode_image(pixel_values)
        cfg = self.config
        zero = self.logit_scale.new_zeros(())
        out = StoryModelOutput(loss=zero)
        if cfg.contrastive_weight > 0:
            scale = self.contrastive_scale()
            text = self.text_embedding(captions, pooled=text_pooled)
            out.contrastive_loss = contrastive_loss(self.image_embedding(image_pooled), text, scale,
                                                    heads=cfg.contrastive_heads)
            out.loss = out.loss + cfg.contrastive_weight * out.contrastive_loss
        if cfg.caption_weight > 0:
            embeds, mask, labels = self._caption_batch(self.visual_prefix(image_tokens, image_pooled), captions)
            logits = self.decoder(inputs_embeds=embeds, attention_mask=mask).logits
            out.caption_loss = caption_loss(logits, labels)
            out.loss = out.loss + cfg.caption_weight * out.caption_loss
        if self.caption_decoder is not None and cfg.caption_decoder_weight > 0:
            ids, padding = self._caption_decoder_batch(captions, image_tokens.device)
            logits = self.caption_decoder(ids, image_tokens.float(), padding, self.image_tags(image_pooled))
            labels = ids.masked_fill(padding, IGNORE_INDEX)
            labels[:, 0] = IGNORE_INDEX  # BOS is given, never predicted
            out.caption_decoder_loss = caption_loss(logits, labels)
            out.loss = out.loss + cfg.caption_decoder_weight * out.caption_decoder_loss
        return out

    def _self_critical(self, samples: list[list[int]], advantages: torch.Tensor | None,
                       pixel_values: torch.Tensor | None, image_tokens: torch.Tensor | None,
                       image_pooled: torch.Tensor | None) -> StoryModelOutput:
        cfg = self.config
        if self.caption_decoder is None or cfg.caption_decoder_weight == 0:
            raise ValueError("self-critical training needs the caption decoder (caption_decoder_weight > 0)")
        if cfg.contrastive_weight > 0 or cfg.caption_weight > 0:
            raise ValueError("self-critical training trains the caption decoder alone: set contrastive_weight and "
                             "caption_weight to 0")
        if advantages is None or advantages.shape != (len(samples),):
            raise ValueError("pass one advantage per caption sample")
        if image_tokens is None:
            image_tokens, image_pooled = self.encode_image(pixel_values)
        if image_tokens.shape[0] != len(samples):
            raise ValueError(f"{len(samples)} caption samples for {image_tokens.shape[0]} image rows")
        ids, padding = self._compact_batch(samples, image_tokens.device)
        logprobs, real = self._token_logprobs(ids, padding, image_tokens, image_pooled)
        loss = self_critical_loss(logprobs, real, advantages.to(logprobs.device))
        return StoryModelOutput(loss=cfg.caption_decoder_weight * loss, caption_decoder_loss=loss)

    def _caption_ids(self, captions: list[str], max_tokens: int, eos: int | None = None) -> list[list[int]]:
        ids = self.tokenize_captions(captions)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return [row[:max_tokens] + [eos] for row in ids]

    def tokenize_captions(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer([normalize_caption(c) for c in captions], add_special_tokens=False).input_ids

    def fit_caption_vocabulary(self, captions: list[str]) -> None:
        """Give the caption decoder its compact vocabulary from the training captions (once, before training)."""
        if self.caption_decoder is not None:
            self.caption_decoder.fit_vocabulary(self.tokenize_captions(captions))

    def _caption_batch(self, prefix: torch.Tensor, captions: list[str]):
        """[prefix inside the chat prompt][caption][EOS][pad]; only caption and EOS are labelled."""
        device, embed = prefix.device, self.decoder.get_input_embeddings()
        before, after = self.caption_prompt().split(IMAGE_PLACEHOLDER)
        before_ids = self.tokenizer(before, add_special_tokens=False).input_ids
        after_ids = self.tokenizer(after, add_special_tokens=False).input_ids
        targets = self._caption_ids(captions, self.config.max_caption_tokens)
        width = max(len(t) for t in targets)
        rows = [after_ids + t + [self.tokenizer.pad_token_id] * (width - len(t)) for t in targets]
        after_tensor = torch.tensor(rows, device=device)
        batch = prefix.shape[0]
        before_tensor = torch.tensor([before_ids] * batch, device=device, dtype=torch.long)
        embeds = torch.cat([embed(before_tensor), prefix, embed(after_tensor)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        labels = torch.full(embeds.shape[:2], IGNORE_INDEX, dtype=torch.long, device=device)
        start = len(before_ids) + prefix.shape[1] + len(after_ids)
        for i, t in enumerate(targets):
            labels[i, start: start + len(t)] = torch.tensor(t, device=device)
            mask[i, start + len(t):] = 0
        return embeds, mask, labels

    def _caption_decoder_batch(self, captions: list[str], device: torch.device):
        dec = self.caption_decoder
        if dec.needs_vocabulary:
            raise RuntimeError("the caption decoder has no vocabulary yet: call model.fit_caption_vocabulary(captions) "
                               "with the training captions before training")
        return self._compact_batch(dec.to_compact(self.tokenize_captions(captions)), device)

    def _compact_batch(self, compact: list[list[int]], device: torch.device):
        """[BOS, ids..., EOS, PAD...] rows (cut to the decoder's length) and their padding mask."""
        dec = self.caption_decoder
        targets = [(row + [dec.EOS])[: dec.max_length - 1] for row in compact]
        width = max(len(t) for t in targets) + 1
        ids = torch.full((len(targets), width), dec.PAD, dtype=torch.long, device=device)
        padding = torch.ones(len(targets), width, dtype=torch.bool, device=device)
        for i, t in enumerate(targets):
            ids[i, : len(t) + 1] = torch.tensor([dec.BOS] + t, device=device)
            padding[i, : len(t) + 1] = False
        return ids, padding

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

    # --- captioning ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor | None = None, *, image_tokens: torch.Tensor | None = None,
                          image_pooled: torch.Tensor | None = None, max_new_tokens: int | None = None,
                          num_beams: int | None = None, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                          captioner: str | None = None, rerank: float | None = None,
                          concepts: float | None = None) -> list[str]:
        """One caption per image, batched, from the configured captioning path.

        `rerank` (default: the config's `caption_rerank`) > 0 picks, among the caption decoder's beams, the one with
        the best log-probability + rerank x cosine agreement with the image under the contrastive head: beam search
        alone favours the captions most common in the training data over the ones specific to the picture. With
        distractors (`caption_distractors`) the cosine is taken relative to the training images' (log p(image |
        caption), over the temperature), so that a caption as true of many other pictures does not win.
        `concepts` (default: the config's `caption_concepts`) > 0 makes the caption decoder's beam search write the
        word of a class the image classifier is that sure of (`concept_words`).
        """
        if image_tokens is None:
            image_tokens, image_pooled = self.encode_image(pixel_values)
        captioner = captioner or self.config.captioner
        max_new_tokens = max_new_tokens or self.config.max_caption_tokens
        rerank = self.config.caption_rerank if rerank is None else rerank
        num_beams = self.config.caption_beams if num_beams is None else num_beams
        concepts = self.config.caption_concepts if concepts is None else concepts
        if captioner == "caption_decoder":
            if self.caption_decoder is None:
                raise ValueError("this model has no caption decoder; use captioner='decoder'")
            required = None
            if concepts > 0 and num_beams > 1 and image_pooled is not None:
                required = self.concept_words(image_pooled, concepts)
            if rerank > 0 and num_beams > 1 and image_pooled is not None:
                return self._reranked_captions(image_tokens, image_pooled, max_new_tokens, num_beams, length_penalty,
                                               repetition_penalty, rerank, required)
            compact = self.caption_decoder.generate(image_tokens.float(), max_new_tokens, num_beams, length_penalty,
                                                    repetition_penalty, self.image_tags(image_pooled), required)
            ids = self.caption_decoder.to_tokenizer(compact)
        else:
            prefix = self.visual_prefix(image_tokens, image_pooled)
            prompt = self.caption_prompt()
            embeds = torch.stack([self.prompt_embeddings(prompt, [p]) for p in prefix])
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        num_beams=num_beams, do_sample=False, repetition_penalty=repetition_penalty,
                                        length_penalty=length_penalty, pad_token_id=self.tokenizer.pad_token_id)
            ids = out.tolist()
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [tidy_caption(t) for t in texts]

    def _reranked_captions(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor, max_new_tokens: int,
                           num_beams: int, length_penalty: float, repetition_penalty: float,
                           weight: float, required: list[tuple[int, ...] | None] | None = None) -> list[str]:
        found = self.caption_decoder.candidates(image_tokens.float(), max_new_tokens, num_beams, length_penalty,
                                                repetition_penalty, self.image_tags(image_pooled), required)
        texts = [self._decode_compact([ids for _, ids in rows]) for rows in found]
        flat = [t for rows in texts for t in rows]
        agreement = self.caption_agreement(flat, image_pooled)
        chosen, start = [], 0
        for image, rows in enumerate(found):
            scores = [logprob + weight * float(agreement[start + j, image]) for j, (logprob, _) in enumerate(rows)]
            chosen.append(texts[image][max(range(len(rows)), key=scores.__getitem__)])
            start += len(rows)
        return [tidy_caption(t) for t in chosen]

    def caption_agreement(self, captions: list[str], image_pooled: torch.Tensor) -> torch.Tensor:
        """[captions, images] agreement for caption reranking: the cosine under the contrastive head, less (with
        distractors) logsumexp over the distractor images' logits / scale, i.e. log p(image | caption) / scale among
        the training images, which a caption as true of many of them does not win."""
        embedded = self.text_embedding(captions)
        agreement = embedded @ self.image_embedding(image_pooled).T
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

    # --- save / load -----------------------------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a spec cannot rebuild: bridge, projections, caption decoder, LoRA and fully trained parts."""
        keep = {}
        for name, tensor in self.state_dict().items():
            part = name.split(".", 1)[0]
            if part in ("vision", "text", "decoder"):
                cfg = getattr(self.config, part)
                if not (cfg.train == "full" or not is_reproducible(cfg.spec, cfg.pretrained)
                        or (cfg.train == "lora" and "lora_" in name)):
                    continue
            keep[name] = tensor.detach().to("cpu").clone().contiguous()  # clone: tied weights share storage
        return keep

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors; a LoRA writer's adapters go beside them in PEFT's own format
        (adapter_config.json + adapter_model.safetensors), so `peft.PeftModel.from_pretrained` loads them too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_json(directory / CONFIG_NAME)
        tensors = self.trained_state_dict()
        adapters = {k: tensors.pop(k) for k in list(tensors) if k.startswith("decoder.") and "lora_" in k}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if adapters:
            save_writer_adapters(adapters, self.config.decoder, directory)
        return directory

    def load_trained_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load saved tensors; every saved tensor must find its place (shape and name)."""
        if "text_projection.weight" in tensors:  # saved before the text projection became a ProjectionHead
            tensors = {("text_projection.linear.weight" if k == "text_projection.weight" else k): v
                       for k, v in tensors.items()}
        own = self.state_dict()
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise ValueError(f"saved weights do not fit this model: unexpected tensors {unexpected[:5]}")
        mismatched = [k for k, v in tensors.items() if own[k].shape != v.shape]
        if mismatched:
            raise ValueError(f"saved weights do not fit this model: shape mismatch for {mismatched[:5]}")
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> StoryModel:
        """Load from a packaged name (e.g. 'mmstory-small'), a local directory, or a hub id (needs network)."""
        directory = resolve_pretrained(name_or_path)
        config = ModelConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        weights = directory / WEIGHTS_NAME
        tensors = load_file(str(weights)) if weights.is_file() else {}
        if (directory / ADAPTER_WEIGHTS_NAME).is_file():
            tensors.update(load_writer_adapters(directory))
        if tensors:
            model.load_trained_state(tensors)
        model.eval()
        return model


def save_writer_adapters(adapters: dict[str, torch.Tensor], part: PartConfig, directory: Path) -> None:
    """The writer's LoRA tensors under PEFT's names ("base_model.model.<module>.lora_A.weight") and its config."""
    from peft import LoraConfig

    peft_names = {"base_model.model." + k[len("decoder."):].replace(".default.", "."): v for k, v in adapters.items()}
    save_file(peft_names, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters})
    config = LoraConfig(r=part.lora_r, lora_alpha=part.lora_alpha, lora_dropout=part.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=part.spec)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True,
                                                            default=sorted) + "\n")


def load_writer_adapters(directory: Path) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors back under this model's names (peft's injected adapter is called "default")."""
    out = {}
    for name, tensor in load_file(str(directory / ADAPTER_WEIGHTS_NAME)).items():
        if not name.startswith("base_model.model.") or ".lora_" not in name:
            raise ValueError(f"{directory / ADAPTER_WEIGHTS_NAME}: {name!r} is not a LoRA tensor of PEFT's format")
        module, rest = name[len("base_model.model."):].split(".lora_", 1)
        kind, leaf = rest.split(".", 1)
        out[f"decoder.{module}.lora_{kind}.default.{leaf}"] = tensor
    return out


def normalize_caption(text: str) -> str:
    """Crowd captions arrive as 'A dog runs .': collapse spaces, drop the detached final period, keep the case."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)
    return text


def tidy_caption(text: str) -> str:
    """Reattach the clitics the crowd captions detach ('the cat 's face' -> "the cat's face"); metrics re-split them
    with the PTB tokenizer, so scores do not change."""
    return re.sub(r"\s+('s|'re|n't)\b", r"\1", text.strip())


def _default_lora_targets(module: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    for group in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["qkv"]):
        if all(n in names for n in group):
            return group
    raise ValueError(f"cannot guess LoRA target modules for {type(module).__name__}; set lora_targets")
