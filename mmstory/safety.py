"""A configurable content filter for prompts and stories: word-boundary matching against a blocklist."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mmstory.text import split_sentences

# A deliberately small default list of unambiguous terms; deployments extend or replace it.
DEFAULT_BLOCKLIST = (
    "behead", "beheading", "child porn", "dismember", "dismembered", "gore", "kill yourself", "massacre",
    "nazi", "porn", "pornographic", "rape", "raped", "sex", "sexual", "slaughter", "suicide", "torture", "tortured",
)


@dataclass
class Verdict:
    blocked: bool
    matches: list[str]

    @property
    def message(self) -> str:
        if not self.blocked:
            return ""
        return ("The content filter blocked this because it contains: " + ", ".join(sorted(set(self.matches)))
                + ". Rephrase without these words, or configure the filter (ContentFilter(blocklist=...)).")


class ContentFilter:
    """Blocks whole words and phrases (case-insensitive); `enabled=False` turns it off."""

    def __init__(self, blocklist: Iterable[str] | None = None, extra: Iterable[str] = (), enabled: bool = True):
        words = list(DEFAULT_BLOCKLIST if blocklist is None else blocklist) + list(extra)
        self.enabled = enabled and bool(words)
        self.words = sorted({w.strip().lower() for w in words if w.strip()})
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE) \
            if self.words else None

    def check(self, text: str) -> Verdict:
        if not self.enabled or not text or self._pattern is None:
            return Verdict(False, [])
        matches = [m.group(0).lower() for m in self._pattern.finditer(text)]
        return Verdict(bool(matches), matches)

    def redact(self, text: str) -> str:
        """Drop the sentences that contain blocked words."""
        if self._pattern is None:
            return text
        sentences = split_sentences(text, keep_closers=True)
        return " ".join(s for s in sentences if not self._pattern.search(s)).strip()
