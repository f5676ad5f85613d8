"""What a loss needs from the other processes of a data-parallel run: their features (with gradients back to each
process's own rows) and their token counts. In one process, or with no process group, every helper is the identity.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (each the same shape), concatenated in rank order along dim 0.

    The backward pass sums each process's gradient of its own loss into the rows it contributed (the all-gather's
    adjoint is a reduce-scatter), so after data-parallel's gradient averaging a loss over gathered features trains
    as one process with the global batch would (open_clip's `gather_with_grad`)."""
    if world()[1] == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.10+ calls it deprecated in favour of a private module; it works
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(tensor.contiguous())
    if tensor.requires_grad:
        for part in parts:  # over gloo the backward's all-to-all misreads strided gradients (a transposed matmul's)
            part.register_hook(torch.Tensor.contiguous)
    return torch.cat(parts, dim=0)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over processes, with no gradient (a count or a normaliser, not a feature)."""
    if world()[1] == 1:
        return tensor.detach()
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total
