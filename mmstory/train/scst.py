"""Self-critical sequence training (SCST) of the caption decoder: sampled captions rewarded by CIDEr-D (plus, if
asked, how well each retrieves its own image), each against the mean reward of its image's other samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmstory.components import similarity
from mmstory.data import ImageCaptions, item_name
from mmstory.eval.metrics import CiderDReward
from mmstory.losses import leave_one_out_baseline
from mmstory.train.inputs import _model_inputs

if TYPE_CHECKING:
    from mmstory.model import StoryModel
    from mmstory.train.config import TrainConfig


def scst_reward(config: TrainConfig, model: StoryModel, records: list[ImageCaptions]) -> CiderDReward | None:
    """The CIDEr-D reward over the training references when the run is self-critical, else None."""
    if config.caption_objective != "scst":
        return None
    if model.caption_decoder is None or model.loss_fn.contrastive_weight > 0 or model.loss_fn.caption_weight > 0:
        raise ValueError("caption_objective: scst trains the caption decoder alone: the model needs one, and "
                         "the loss section must set contrastive_weight and caption_weight to 0")
    return CiderDReward({item_name(r.image): r.captions for r in records})


def self_critical_forward(module: torch.nn.Module, model: StoryModel, batch: dict, config: TrainConfig,
                          reward: CiderDReward, device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    """Sample captions with `model` (no gradient), reward them, then the policy-gradient loss through `module` (the
    same model, wrapped for data-parallel training); returns the outputs and the mean rewards to log."""
    inputs = _model_inputs(batch, device)
    inputs.pop("text_pooled", None)
    if "image_tokens" not in inputs:
        with torch.no_grad():
            inputs["image_tokens"], inputs["image_pooled"] = model.encode_image(inputs.pop("pixel_values"))
    k = config.scst_samples
    compact, texts = model.sample_captions(inputs["image_tokens"], inputs["image_pooled"], k, config.scst_temperature)
    cider = torch.as_tensor(reward(texts, [name for name in batch["names"] for _ in range(k)]), dtype=torch.float32)
    logged = {"sample_cider_d": cider.mean() * 100}
    rewards = cider
    if config.scst_discriminability > 0:
        with torch.no_grad():
            images = model.image_embedding(inputs["image_pooled"])
            logits = model.contrastive_scale() * similarity(model.text_embedding(texts), images)
            own = torch.arange(len(batch["names"]), device=logits.device).repeat_interleave(k)
            retrieval = logits.log_softmax(dim=-1).gather(1, own[:, None])[:, 0].float().cpu()
        rewards = cider + config.scst_discriminability * retrieval
        logged["sample_image_logprob"] = retrieval.mean()
    advantages = rewards - leave_one_out_baseline(rewards, k)
    repeated = {name: value.repeat_interleave(k, dim=0) for name, value in inputs.items()}
    out = module(**repeated, caption_samples=compact, sample_advantages=advantages.to(device))
    return out, {name: value.to(device) for name, value in logged.items()}
