"""One training step of the tiny model on a fixed global batch, split over the processes of this run (torchrun):
the losses (mean over processes, as the trainer logs them) and the gradients data-parallel leaves on the weights,
saved by rank 0. tests/test_train.py runs it with one and with two processes and compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_step.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmstory import create_model
from mmstory.losses import StoryLoss

# captions of different lengths: a per-process token mean differs from the global batch's
CAPTIONS = ["a dog", "two children play on a long sandy beach near the sea", "a red car",
            "a man in a blue jacket rides a bicycle down a steep hill"]
SAMPLES = ["a cat on a mat", "dog", "a bird flies over the water at sunset", "two men"]
ADVANTAGES = torch.tensor([1.0, -0.5, 0.25, -1.0])
LOSSES = ("loss", "contrastive_loss", "caption_loss", "caption_decoder_loss")


def step(model: torch.nn.Module, rows: slice, **inputs) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One forward and backward through DDP on this process's rows; the losses averaged over processes and the
    (already averaged) gradients."""
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    model.zero_grad(set_to_none=True)
    out = ddp(**{name: value[rows] for name, value in inputs.items()})
    out.loss.backward()
    losses = {}
    for name in LOSSES:
        value = getattr(out, name)
        if value is not None:
            value = value.detach().clone()
            dist.all_reduce(value)
            losses[name] = value.item() / dist.get_world_size()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model("tiny")
    model.fit_caption_vocabulary(CAPTIONS + SAMPLES)
    model.eval()  # the same features on every call
    pixels = torch.randn(len(CAPTIONS), 3, model.vision.image_size, model.vision.image_size,
                         generator=torch.Generator().manual_seed(1))
    width = len(CAPTIONS) // size
    rows = slice(rank * width, (rank + 1) * width)
    with torch.no_grad():
        tokens, pooled = model.encode_image(pixels)

    xe_losses, xe_grads = step(model, rows, image_tokens=tokens, image_pooled=pooled, captions=CAPTIONS)
    model.loss_fn = StoryLoss(contrastive_weight=0.0, caption_weight=0.0)  # self-critical: the caption decoder alone
    samples = model.caption_decoder.to_compact(model.tokenize_captions(SAMPLES))
    scst_losses, scst_grads = step(model, rows, image_tokens=tokens, image_pooled=pooled, caption_samples=samples,
                                   sample_advantages=ADVANTAGES)
    if rank == 0:
        torch.save({"world_size": size, "xe": (xe_losses, xe_grads), "scst": (scst_losses, scst_grads)}, out)
    dist.barrier()  # no process leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
