"""What one decode step's matrix products cost at 1, 6, 8, 48 and 64 rows, int4 (the CLI's kernel) against dense
bf16 (the batching server's, also in its 64-row blocks) and float32, for SmolLM2-135M's linear shapes: whether
batching requests can still pay off on this CPU.

    OMP_NUM_THREADS=1 python scripts/linear_cost.py

Prints microseconds per set of the three products and the GFLOP/s they reach: where the rows' cost stops falling,
the kernel is compute-bound and one step over 48 rows cannot cost much less than eight steps over 6.
"""

from __future__ import annotations

import time

import torch

from mmstory.decoding import _linear, pack_linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # one layer's qkv, output, gate+up, down [out, in]
FORMATS = {"int4": ("int4", torch.bfloat16, 0), "bf16": (None, torch.bfloat16, 0),
           "bf16, 64-row blocks": (None, torch.bfloat16, 64), "float32": (None, torch.float32, 0)}


def cost(weights: str, rows: int, repeat: int = 100) -> float:
    quantize, dtype, row_block = FORMATS[weights]
    total = 0.0
    for n, k in SHAPES:
        weight = pack_linear(torch.randn(n, k) * 0.02, quantize, dtype)
        x = torch.randn(rows, k, dtype=dtype)
        for _ in range(5):
            _linear(x, weight, row_block)
        start = time.perf_counter()
        for _ in range(repeat):
            _linear(x, weight, row_block)
        total += (time.perf_counter() - start) / repeat
    return total


def main() -> None:
    torch.manual_seed(0)
    macs = sum(n * k for n, k in SHAPES)
    print("| weights | rows | us per set | us per row | GFLOP/s |\n| --- | --- | --- | --- | --- |")
    for weights in FORMATS:
        for rows in (1, 6, 8, 48, 64):
            seconds = cost(weights, rows)
            print(f"| {weights} | {rows} | {seconds * 1e6:.0f} | {seconds * 1e6 / rows:.0f} | "
                  f"{2 * macs * rows / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
