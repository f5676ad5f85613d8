"""Where inference runs: one rule for the Python API, the CLI and the server.

`resolve_device(None)` (or "auto") is CUDA when `torch.cuda.is_available()`, else the CPU. A device that this machine
does not have is refused with a `DeviceError` whose message says what to use instead, before any model is loaded.
"""

from __future__ import annotations

import torch

DeviceLike = str | torch.device | None
DEVICE_HELP = "where the model runs: auto (cuda when available, else cpu), cpu, cuda or cuda:N"


class DeviceError(ValueError):
    """A device this machine cannot run on; the message names the problem and what to use instead."""


def default_device() -> torch.device:
    """cuda when PyTorch sees a CUDA GPU, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: DeviceLike = None) -> torch.device:
    """The torch.device for `device` (None/"auto": `default_device()`), checked against this machine."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        return default_device()
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device.strip().lower())
    except (RuntimeError, AttributeError, TypeError) as err:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise DeviceError(f"device {str(resolved)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise DeviceError(f"device {str(resolved)!r} was asked for, but CUDA is not available on this machine "
                          f"(PyTorch {torch.__version__}, built with {build}; no usable GPU found); "
                          "use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"device {str(resolved)!r} does not exist: this machine has {count} CUDA device(s) "
                          f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return resolved


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16). Without them PyTorch's bf16 products fall
    back to a generic loop: on an AVX2-only CPU a 64-row bf16 product took 2.4x the int4 one (docs/benchmarks.md),
    and bf16-autocast training ran 15x slower than float32 (docs/captions.md)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and check() for check in checks)
