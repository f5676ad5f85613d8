"""StoryModel: the CoCa-style image-text model, readable top to bottom.

    image -> VisionEncoder -> tokens [B,N,Dv], pooled [B,Dp]
        pooled -> image_projection -> shared space <- text_projection <- TextEncoder <- caption   (InfoNCE)
        tokens -> bridge -> visual prefix [B,K,Dd] -> causal LM over [prefix, prompt, caption]    (caption CE)
        tokens -> caption_decoder (optional, CoCa's own small multimodal decoder)                 (caption CE)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmstory.batches import CaptionBatchesMixin, normalize_caption  # noqa: F401 - re-exported
from mmstory.caption_decoder import CaptionDecoder
from mmstory.captioning import CaptioningMixin, ImageWordsMixin, tidy_caption  # noqa: F401
from mmstory.components import MLPBridge, ProjectionHead, ResamplerBridge, TextEncoder, VisionEncoder
from mmstory.config import GenerationConfig, ModelConfig, PartConfig
from mmstory.imagenet_words import imagenet_words
from mmstory.losses import IGNORE_INDEX, StoryLoss, StoryModelOutput
from mmstory.prompts import IMAGE_PLACEHOLDER
from mmstory.registry import get_generation_config
from mmstory.saving import (  # noqa: F401 - re-exported: saving and loading were defined here
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
    load_writer_adapters,
    save_writer_adapters,
)
from mmstory.specs import load_decoder, load_text_encoder, load_vision

CAPTION_SYSTEM = "You describe photographs accurately in one short sentence."


class StoryModel(ImageWordsMixin, CaptioningMixin, CaptionBatchesMixin, PretrainedMixin, nn.Module):
    """The parts, how each trains (frozen, LoRA, full), the encoders and the shared space, the chat prompts and the
    heads' features and logits. Captioning (`mmstory.captioning`), the training batches (`mmstory.batches`),
    saving and loading (`mmstory.saving`) and the weighted losses (`mmstory.losses`) live in their own modules."""

    def __init__(self, config: ModelConfig, generation_config: GenerationConfig | None = None,
                 loss: StoryLoss | None = None):
        """`generation_config` (inference settings) defaults to the one registered with `config.name`; `loss` (the
        training objective `forward` applies when given captions, from `TrainConfig.loss`) to every weight 1.0."""
        super().__init__()
        self.loss_fn = loss if loss is not None else StoryLoss()
        self.config = config
        self.generation_config = generation_config or get_generation_config(config.name)
        self.generation_config.check(config)
        self.vision = VisionEncoder(*load_vision(config.vision.spec, config.vision.pretrained))
        text_model, self.text_tokenizer = load_text_encoder(config.text.spec, config.text.pretrained)
        self.text = TextEncoder(text_model)
        self.writer, self.tokenizer = load_decoder(config.writer.spec, config.writer.pretrained)
        self.tokenizer.padding_side = "right"
        hidden = self.writer.config.hidden_size

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
                                                  tag_slots=c.image_tags * c.tag_tokens, copy_tags=c.copy_tags)
            if c.image_tags:  # tokenizer ids of each class's name (or caption word), -1 padded: [classes, tag_tokens]
                words = imagenet_words().class_word if c.copy_tags else self.vision.class_names()
                names = self.tokenizer([" " + n for n in words], add_special_tokens=False)
                self._class_tokens = torch.tensor([(ids + [-1] * c.tag_tokens)[: c.tag_tokens]
                                                   for ids in names.input_ids], dtype=torch.long)
        for part in ("vision", "text", "writer"):
            self._set_train_mode(part, getattr(config, part))

    # --- freezing / LoRA -------------------------------------------------------------------------------------------
    def _backbone(self, part: str) -> nn.Module:
        return self.writer if part == "writer" else getattr(self, part).model

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
        for part in ("vision", "text", "writer"):
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
        return self.bridge(tokens, pooled).to(self.writer.dtype)

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
        embed = self.writer.get_input_embeddings()
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
                sample_advantages: torch.Tensor | None = None, loss: StoryLoss | None = None,
                tag_classes: torch.Tensor | None = None, decoder_captions: list[str] | None = None
                ) -> StoryModelOutput:
        """Each head's features and logits for a batch of (image, caption) pairs, and the losses `loss` (default:
        `self.loss_fn`) makes of them; pass pixels or cached encoder features (image and text). Heads that `loss`
        weighs 0 are not run.

        Self-critical training passes the caption decoder's own `caption_samples` (compact ids, one per image row)
        with their `sample_advantages` instead of captions: the caption decoder's loss is then the policy gradient
        (`mmstory.losses.self_critical_loss`) and the other heads, which need reference captions, must be off.
        Training's novel-object swaps give the caption decoder alone its own `decoder_captions` and `tag_classes`
        ([B, image_tags], in place of the backbone's top classes as its tags).
        """
        loss = self.loss_fn if loss is None else loss
        if caption_samples is not None:
            loss.check_self_critical()
        elif captions is None:
            raise ValueError("captions are required to compute the training losses")
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or cached image_tokens/image_pooled")
            image_tokens, image_pooled = self.encode_image(pixel_values)
        if caption_samples is not None:
            return loss(self.sample_outputs(caption_samples, sample_advantages, image_tokens, image_pooled))
        return loss(self.outputs(captions, image_tokens, image_pooled, text_pooled, heads=loss,
                                 tag_classes=tag_classes, decoder_captions=decoder_captions))

    def outputs(self, captions: list[str], image_tokens: torch.Tensor, image_pooled: torch.Tensor,
                text_pooled: torch.Tensor | None = None, heads: StoryLoss | None = None,
                tag_classes: torch.Tensor | None = None, decoder_captions: list[str] | None = None
                ) -> StoryModelOutput:
        """Each head's features and logits for (image, caption) pairs, for the heads `heads` (default: `loss_fn`)
        weighs above 0 (the others are not run): all a loss reads."""
        heads = self.loss_fn if heads is None else heads
        out = StoryModelOutput(contrastive_heads=self.config.contrastive_heads)
        if heads.contrastive_weight > 0:
            out.logit_scale = self.contrastive_scale()
            out.text_embeds = self.text_embedding(captions, pooled=text_pooled)
            out.image_embeds = self.image_embedding(image_pooled)
        if heads.caption_weight > 0:
            embeds, mask, labels = self._caption_batch(self.visual_prefix(image_tokens, image_pooled), captions)
            out.caption_logits = self.writer(inputs_embeds=embeds, attention_mask=mask).logits
            out.caption_labels = labels
        if self.caption_decoder is not None and heads.caption_decoder_weight > 0:
            ids, padding = self._caption_decoder_batch(decoder_captions or captions, image_tokens.device)
            out.caption_decoder_logits = self.caption_decoder(ids, image_tokens.float(), padding,
                                                              self.image_tags(image_pooled, tag_classes))
            labels = ids.masked_fill(padding, IGNORE_INDEX)
            labels[:, 0] = IGNORE_INDEX  # BOS is given, never predicted
            out.caption_decoder_labels = labels
        return out

    def sample_outputs(self, samples: list[list[int]], advantages: torch.Tensor | None, image_tokens: torch.Tensor,
                       image_pooled: torch.Tensor | None) -> StoryModelOutput:
        """The caption decoder's log-probabilities of its own samples (compact ids, one per image row), with each
        sample's advantage: what the self-critical loss reads."""
        if self.caption_decoder is None:
            raise ValueError("self-critical training needs the caption decoder (caption_decoder_weight > 0)")
        if advantages is None or advantages.shape != (len(samples),):
            raise ValueError("pass one advantage per caption sample")
        if image_tokens.shape[0] != len(samples):
            raise ValueError(f"{len(samples)} caption samples for {image_tokens.shape[0]} image rows")
        ids, padding = self._compact_batch(samples, image_tokens.device)
        logprobs, real = self._token_logprobs(ids, padding, image_tokens, image_pooled)
        return StoryModelOutput(sample_logprobs=logprobs, sample_mask=real,
                                sample_advantages=advantages.to(logprobs.device))

def _default_lora_targets(module: nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    for group in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["qkv"]):
        if all(n in names for n in group):
            return group
    raise ValueError(f"cannot guess LoRA target modules for {type(module).__name__}; set lora_targets")
