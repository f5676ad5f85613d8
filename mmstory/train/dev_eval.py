"""The captioning task's dev evaluation: dev losses over the whole dev set however many processes share it, CIDEr-D
of greedy captions, and sample captions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmstory.data import EpochBatchSampler, item_name
from mmstory.eval.metrics import caption_scores
from mmstory.losses import caption_loss_sum, contrastive_loss
from mmstory.model import StoryModel
from mmstory.train.inputs import CaptionData, _model_inputs

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmstory.train.config import TrainConfig


class CaptionDevEval:
    """Evaluates the captioning task's model on `data.dev`."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator, data: CaptionData):
        self.config, self.accelerator, self.data = config, accelerator, data

    @torch.no_grad()
    def evaluate(self, model: StoryModel) -> dict[str, float]:
        """Dev losses over the whole dev set, the same whatever the number of processes: the captioners' cross-entropy
        per token of the whole set; the contrastive loss over the set's images in order, in global batches of
        `batch_size` x processes as training contrasts them. Plus sample captions on the main process."""
        acc, split = self.accelerator, self.data.dev
        model.eval()  # the unwrapped model: ranks may run different numbers of dev batches
        weights = model.loss_fn
        token_sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # caption CE, tokens, decoder CE, tokens
        rows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (dev indices, image and text embeddings)
        sampler = EpochBatchSampler(split.caption_counts, self.config.batch_size, rank=acc.process_index,
                                    world_size=acc.num_processes, shuffle=False)
        for keys, batch in zip(sampler, self.data.loader(split, sampler, self.config.seed)):
            self.data.note_skipped(batch["skipped"])
            inputs = _model_inputs(batch, acc.device)
            if "pixel_values" in inputs:
                inputs["image_tokens"], inputs["image_pooled"] = model.encode_image(inputs.pop("pixel_values"))
            with acc.autocast():
                out = model.outputs(batch["captions"], **inputs)
            for i, (logits, labels) in enumerate(((out.caption_logits, out.caption_labels),
                                                  (out.caption_decoder_logits, out.caption_decoder_labels))):
                if logits is not None:
                    summed, tokens = caption_loss_sum(logits, labels)
                    token_sums[2 * i] += summed.double()
                    token_sums[2 * i + 1] += tokens
            if out.image_embeds is not None:
                rows.append(([i for i, _ in keys], out.image_embeds.float().cpu(), out.text_embeds.float().cpu()))
        token_sums = acc.reduce(token_sums, "sum")
        metrics = {}
        for i, name in enumerate(("caption_loss", "caption_decoder_loss")):
            if token_sums[2 * i + 1] > 0:
                metrics[name] = (token_sums[2 * i] / token_sums[2 * i + 1]).item()
        if weights.contrastive_weight > 0:
            metrics["contrastive_loss"] = self._dev_contrastive(model, rows)
        metrics["loss"] = sum(getattr(weights, name.replace("_loss", "_weight")) * value
                              for name, value in metrics.items())
        if self.config.best_metric == "cider_d":
            metrics["cider_d"] = self.cider(model)
        model.train()
        return metrics

    def _dev_contrastive(self, model: StoryModel, rows: list[tuple[list[int], torch.Tensor, torch.Tensor]]) -> float:
        """Every process's dev embeddings, in dev-set order, contrasted in global batches (the last may be short)."""
        from accelerate.utils import gather_object

        gathered = sorted((i, image, text) for indices, images, texts in gather_object(rows)
                          for i, image, text in zip(indices, images, texts))
        images = torch.stack([image for _, image, _ in gathered])
        texts = torch.stack([text for _, _, text in gathered])
        scale, width = model.contrastive_scale().float().cpu(), self.config.batch_size * self.accelerator.num_processes
        total = 0.0
        for start in range(0, len(images), width):
            image, text = images[start: start + width], texts[start: start + width]
            loss = contrastive_loss(image, text, scale, heads=model.config.contrastive_heads, gather=False)
            total += loss.double() * len(image)
        return (total / len(images)).item()

    def cider(self, model: StoryModel) -> float:
        """Corpus CIDEr-D of greedy caption-decoder captions, one per dev image; each process captions a share."""
        from accelerate.utils import gather_object

        if model.caption_decoder is None:
            raise ValueError("best_metric cider_d needs a caption decoder")
        acc, split, captions = self.accelerator, self.data.dev, {}
        mine = range(acc.process_index, len(split.records), acc.num_processes)
        written = []
        for batch, inputs in self.data.image_batches(split, mine, acc.device):
            written += zip(batch["names"], model.generate_captions(**inputs, num_beams=1, captioner="caption_decoder"))
        # from pixels, an undecodable image arrives as its neighbour: score each image that was read, once, against
        # its own references
        for name, caption in gather_object(written):
            captions.setdefault(name, caption)
        references = {item_name(r.image): r.captions for r in split.records}
        scores, _ = caption_scores([references[name] for name in captions], list(captions.values()), use_java=False)
        return scores["CIDEr-D"] * 100

    @torch.no_grad()
    def samples(self, model: StoryModel) -> list[dict[str, Any]]:
        """Captions of the first dev images by the captioner this run trains (the LM through the bridge, or else the
        caption decoder), each with its reference."""
        split = self.data.dev
        count = min(self.config.num_sample_captions, len(split.records))
        if count == 0 or not self.accelerator.is_main_process:
            return []
        batch = split.collate([split.dataset[(i, 0)] for i in range(count)])
        trains_lm = model.loss_fn.caption_weight > 0
        captioner = "writer" if trains_lm or model.caption_decoder is None else "caption_decoder"
        inputs = _model_inputs(batch, self.accelerator.device)
        inputs.pop("text_pooled", None)
        model.eval()
        captions = model.generate_captions(**inputs, captioner=captioner)
        model.train()
        return [{"image": name, "caption": caption, "reference": reference}
                for name, caption, reference in zip(batch["names"], captions, batch["captions"])]
