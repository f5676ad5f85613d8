"""The Trainer's dev evaluation: mean dev losses, CIDEr-D of greedy captions, sample captions, best model and early
stopping."""

from __future__ import annotations

from pathlib import Path

import torch

from mmstory.data import EpochBatchSampler, item_name
from mmstory.eval.metrics import caption_scores
from mmstory.model import StoryModel
from mmstory.train.inputs import _model_inputs

LOSSES = ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss")
SCORES = ("cider_d",)  # dev scores (higher is better): CIDEr-D of the caption decoder's greedy captions


class DevEvalMixin:
    """Dev-set evaluation during training (mixed into `mmstory.train.trainer.Trainer`)."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean dev losses over the whole dev set (shared across processes), plus sample captions on the main one."""
        acc, split = self.accelerator, self.dev_split
        model = acc.unwrap_model(self.model)  # no DDP wrapper: ranks may run different numbers of dev batches
        model.eval()
        sums = torch.zeros(len(LOSSES) + 1, dtype=torch.float64, device=acc.device)
        sampler = EpochBatchSampler(split.caption_counts, self.config.batch_size, rank=acc.process_index,
                                    world_size=acc.num_processes, shuffle=False)
        for batch in self._loader(split, sampler, self.config.seed):
            self._note_skipped(batch["skipped"])
            with acc.autocast():
                out = model(captions=batch["captions"], **_model_inputs(batch, acc.device))
            n = len(batch["captions"])
            for i, name in enumerate(LOSSES):
                value = getattr(out, name)
                if value is not None:
                    sums[i] += value.double() * n
            sums[-1] += n
        sums = acc.reduce(sums, "sum")
        metrics = {name: (sums[i] / sums[-1]).item() for i, name in enumerate(LOSSES) if sums[i] != 0}
        if self.config.best_metric == "cider_d":
            metrics["cider_d"] = self._dev_cider(model)
        if acc.is_main_process and self.config.num_sample_captions > 0:
            self._sample_captions(model)
        model.train()
        return metrics

    def _dev_cider(self, model: StoryModel) -> float:
        """Corpus CIDEr-D of greedy caption-decoder captions, one per dev image (every rank computes the same)."""
        if model.caption_decoder is None:
            raise ValueError("best_metric cider_d needs a caption decoder")
        split, captions = self.dev_split, {}
        for batch, inputs in self._image_batches(split, range(len(split.records)), self.accelerator.device):
            written = model.generate_captions(**inputs, num_beams=1, captioner="caption_decoder")
            # from pixels, an undecodable image arrives as its neighbour: score each image that was read, once,
            # against its own references
            for name, caption in zip(batch["names"], written):
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
