"""What one decode step's matrix products cost at 1, 6, 8 and 48 rows, int4 (the shipped kernel) against dense
float32, for SmolLM2-135M's three linear shapes: whether batching requests can still pay off on this CPU.

    OMP_NUM_THREADS=1 python scripts/linear_cost.py

Prints microseconds per set of the three products and the GFLOP/s they reach: where the rows' cost stops falling,
the kernel is compute-bound and one step over 48 rows cannot cost much less than eight steps over 6.
"""

from __future__ import annotations

import time

import torch

from mmstory.decoding import _linear, pack_linear

SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # gate/up, down, attention output [out, in]


def cost(quantize: str | None, rows: int, repeat: int = 200) -> float:
    total = 0.0
    for n, k in SHAPES:
        weight = pack_linear(torch.randn(n, k), quantize, torch.float32)
        x = torch.randn(rows, k, dtype=torch.bfloat16 if quantize else torch.float32)
        for _ in range(5):
            _linear(x, weight)
        start = time.perf_counter()
        for _ in range(repeat):
            _linear(x, weight)
        total += (time.perf_counter() - start) / repeat
    return total


def main() -> None:
    torch.manual_seed(0)
    macs = sum(n * k for n, k in SHAPES)
    print("| weights | rows | us per set | us per row | GFLOP/s |\n| --- | --- | --- | --- | --- |")
    for quantize in ("int4", None):
        for rows in (1, 6, 8, 48):
            seconds = cost(quantize, rows)
            print(f"| {quantize or 'float32'} | {rows} | {seconds * 1e6:.0f} | {seconds * 1e6 / rows:.0f} | "
                  f"{2 * macs * rows / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
