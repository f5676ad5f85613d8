"""The allowed range of every number a story request carries, in one table: `Decoding.validate` checks against it,
and the CLI's flags, the JSON API's schema and the demo's sliders are built from it, so the four surfaces refuse the
same values with the same one-line message.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from mmstory.prompts import StoryInputError


class LimitError(StoryInputError):
    """A number outside its allowed range (or not a finite number at all); the message names the range."""


@dataclass(frozen=True)
class Limit:
    """An inclusive range [low, high] for one setting; `whole`: only integers are allowed."""

    low: float
    high: float
    whole: bool = False

    def describe(self) -> str:
        return f"between {_number(self.low)} and {_number(self.high)}"

    def check(self, name: str, value: object) -> None:
        """Raise LimitError unless `value` is a finite number (an integer when `whole`) inside the range."""
        kind = "a whole number" if self.whole else "a finite number"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LimitError(f"{name} must be {kind} {self.describe()}, got {value!r}")
        if self.whole and not isinstance(value, numbers.Integral):
            raise LimitError(f"{name} must be {kind} {self.describe()}, got {value!r}")
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise LimitError(f"{name} must be {kind} {self.describe()}, got {_number(value)}")


def _number(value: float) -> str:
    if isinstance(value, int) and abs(value) >= 2**31:
        return "2**63 - 1" if value == 2**63 - 1 else f"{value:,}"
    return f"{value:g}" if isinstance(value, float) else str(value)


# The story writer's decoding settings (`mmstory.generation.Decoding`). The demo's sliders span exactly these ranges;
# beyond them a story is gibberish (temperature), a repetition loop (repetition_penalty < 1) or minutes and gigabytes of
# beam search (num_beams) without being any better.
DECODING_LIMITS: dict[str, Limit] = {
    "temperature": Limit(0.05, 2.0),
    "top_k": Limit(0, 200, whole=True),  # 0: off
    "top_p": Limit(0.05, 1.0),
    "repetition_penalty": Limit(1.0, 2.0),
    "no_repeat_ngram_size": Limit(0, 8, whole=True),  # 0: off
    "num_candidates": Limit(1, 8, whole=True),
    "num_beams": Limit(1, 8, whole=True),
    "seed": Limit(0, 2**63 - 1, whole=True),
    "max_new_tokens": Limit(1, 2048, whole=True),
}
# `mmstory caption --num-beams` (the packaged model's own default is 10 beams) and `--batch-size`
CAPTION_BEAMS = Limit(1, 32, whole=True)
CAPTION_BATCH_SIZE = Limit(1, 256, whole=True)
