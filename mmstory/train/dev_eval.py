"""The Trainer's dev evaluation: mean dev losses, CIDEr-D of greedy captions, sample captions, best model and early
stopping."""

from __future__ import annotations

from pathlib import Path

import torch

from mmstory.data import EpochBatchSampler, item_name
from mmstory.eval.metrics import caption_scores
from mmstory.losses import caption_loss_sum, contrastive_loss
from mmstory.model import StoryModel
from mmstory.train.config import LOSSES, SCORES  # noqa: F401 - re-exported
from mmstory.train.inputs import _model_inputs


class DevEvalMixin:
    """Dev-set evaluation during training (mixed into `mmstory.train.trainer.Trainer`)."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev losses over the whole dev set, the same whatever the number of processes: the captioners' cross-entropy
        per token of the whole set; the contrastive loss over the set's images in order, in global batches of
        `batch_size` x processes as training contrasts them. Plus sample captions on the main process."""
        acc, split = self.accelerator, self.dev_split
        model = acc.unwrap_model(self.model)  # no DDP wrapper: ranks may run different numbers of dev batches
        model.eval()
        weights = model.loss_fn
        token_sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # caption CE, tokens, decoder CE, tokens
        rows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []  # (dev indices, image and text embeddings)
        sampler = EpochBatchSampler(split.caption_counts, self.config.batch_size, rank=acc.process_index,
                                    world_size=acc.num_processes, shuffle=False)
        for keys, batch in zip(sampler, self._loader(split, sampler, self.config.seed)):
            self._note_skipped(batch["skipped"])
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
            metrics["cider_d"] = self._dev_cider(model)
        if acc.is_main_process and self.config.num_sample_captions > 0:
            self._sample_captions(model)
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

    def _dev_cider(self, model: StoryModel) -> float:
        """Corpus CIDEr-D of greedy caption-decoder captions, one per dev image; each process captions a share."""
        from accelerate.utils import gather_object

        if model.caption_decoder is None:
            raise ValueError("best_metric cider_d needs a caption decoder")
        acc, split, captions = self.accelerator, self.dev_split, {}
        mine = range(acc.process_index, len(split.records), acc.num_processes)
        written = []
        for batch, inputs in self._image_batches(split, mine, acc.device):
            written += zip(batch["names"], model.generate_captions(**inputs, num_beams=1, captioner="caption_decoder"))
        # from pixels, an undecodable image arrives as its neighbour: score each image that was read, once, against
        # its own references
        for name, caption in gather_object(written):
            captions.setdefault(name, caption)
        references = {item_name(r.image): r.captions for r in split.records}
        scores, _ = caption_scores([references[name] for name in captions], list(captions.values()), use_java=False)
        return scores["CIDEr-D"] * 100

    def _sample_captions(self, model: StoryModel) -> None:
        split = self.dev_split
        count = min(self.config.num_sample_captions, len(split.records))
        batch = split.collate([split.dataset[(i, 0)] for i in range(count)])
        # show the captioner this run trains: the LM through the bridge, or else the caption decoder
        trains_lm = model.loss_fn.caption_weight > 0
        captioner = "writer" if trains_lm or model.caption_decoder is None else "caption_decoder"
        inputs = _model_inputs(batch, self.accelerator.device)
        inputs.pop("text_pooled", None)
        captions = model.generate_captions(**inputs, captioner=captioner)
        step = self.state.global_step
        lines = []
        for name, caption, reference in zip(batch["names"], captions, batch["captions"]):
            self._log({"step": step, "image": name, "caption": caption, "reference": reference}, "samples.jsonl")
            lines.append(f"  {Path(name).name}: {caption!r} (reference: {reference!r})")
        self._print(f"sample captions at step {step}:\n" + "\n".join(lines))
        self.accelerator.get_tracker("tensorboard", unwrap=True).add_text("samples", "\n\n".join(lines), step)

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best dev loss (saving that model) and return True when early stopping says stop."""
        state = self.state
        state.last_eval_step, self.last_dev = state.global_step, metrics
        value = metrics.get(self.config.best_metric)
        if value is None:
            raise ValueError(f"best_metric {self.config.best_metric!r} is not computed by this run's losses")
        better = (lambda a, b: a > b) if self.config.best_metric in SCORES else (lambda a, b: a < b)
        improved = state.best_value is None or better(value, state.best_value)
        if improved:
            state.best_value, state.best_step, state.evals_since_best = value, state.global_step, 0
            self._save_best()
        else:
            state.evals_since_best += 1
        self._log({"step": state.global_step, "split": "dev", **metrics, "best_value": state.best_value,
                   "epoch": state.epoch})
        self.accelerator.log({f"dev/{k}": v for k, v in metrics.items()}, step=state.global_step)
        self._print(f"step {state.global_step}: dev loss {metrics['loss']:.4f}, {self.config.best_metric} "
                    f"{value:.4f} (best {state.best_value:.4f} "
                    f"at step {state.best_step})")
        patience = self.config.early_stopping_patience
        return patience is not None and state.evals_since_best >= patience
