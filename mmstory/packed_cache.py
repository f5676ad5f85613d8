"""The story writer's int4/int8 weights, packed once and kept in the user cache.

Packing SmolLM2's 135M weights into the int4 kernel's layout takes ~2 s of every start (CLI story, server); reading the
packed tensors back takes ~0.1 s. The file is named by a SHA-1 of everything the packing reads (every tensor of the
writer, LoRA adapters included, and the packing's settings), which hashes in ~0.2 s: changed weights get a new file,
never a stale one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "1"  # bump when the packed layout changes


def fingerprint(model: torch.nn.Module, quantize: str, dtype: torch.dtype) -> str:
    """A digest of the model's tensors and of the packing settings."""
    digest = hashlib.sha1(f"{FORMAT}|{quantize}|{dtype}|{torch.__version__}|{platform.machine()}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_tensors(key: str, build: Callable[[], dict[str, torch.Tensor]],
                   directory: Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors stored under `key`, else `build()`'s, stored for next time (written atomically; a cache that
    cannot be written or read is only a slower start)."""
    if directory is None:
        from mmstory.specs import cache_dir

        directory = cache_dir() / "packed"
    path = directory / f"{key}.safetensors"
    if path.is_file():
        try:
            # copied into torch's own (64-byte aligned) memory: the packed matmul kernels crash on the file's offsets
            return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
        except Exception:  # noqa: BLE001 - a truncated or foreign file: pack again and replace it
            pass
    tensors = build()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(handle)
        save_file({name: t.contiguous() for name, t in tensors.items()}, temporary)
        os.replace(temporary, path)
    except OSError:
        pass
    return tensors
