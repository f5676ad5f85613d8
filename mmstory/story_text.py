"""The story's text as a reader gets it: the raw generation cleaned (a title, the chat model's note to the user, the
request echoed back), sentences said twice dropped, and cut to whole sentences within the word budget; while
streaming, the part of the text that is already final."""

from __future__ import annotations

import re

from mmstory.text import split_sentences

# a sentence end, with the closing quote or bracket after it
ENDS_SENTENCE = re.compile(r"[.!?][\"'”’)\]]*$")
LINE_BREAK = "\u00b6"  # a poem's line break while finish_story cuts the text into sentences


def finish_story(text: str, budget: int, keep_lines: bool = False) -> str:
    """Clean the raw generation, drop sentences said a second time, and cut it to whole sentences within ~115% of
    the word budget; a quotation the cut leaves open is closed.

    When whole sentences would leave the story well short (one long run-on sentence crossing the limit), the next
    sentence is cut at its last clause boundary (comma, semicolon, colon) that fits, and closed with a period.
    `keep_lines`: a poem's line breaks stay (each rides on its line's first word, so it counts no word of its own).
    """
    return _close_quotation(_cut(text, budget, keep_lines))


def _cut(text: str, budget: int, keep_lines: bool) -> str:
    """`finish_story` without closing a quotation: a stream's settled part is not the end, and its speech may go on."""
    text = re.sub(r"\s+\n", "\n", text.replace("\r", "")).strip()
    text = re.sub(r"^(title:.*\n|#+.*\n)", "", text, flags=re.IGNORECASE).strip()
    paragraphs = text.split("\n")
    for i, paragraph in enumerate(paragraphs[1:], start=1):  # the chat model's note to the user after the story
        if _NOTE_TO_USER.search(paragraph):
            text = "\n".join(paragraphs[:i]).strip()
            break
    echo = _REQUEST_ECHO.search(text)
    if echo:
        text = text[: echo.start()].strip()
    if keep_lines:
        text = re.sub(r"\s*\n\s*", " " + LINE_BREAK, text)
    limit = budget * 1.15
    kept, words = [], 0
    sentences = split_sentences(text, keep_closers=True)  # a closing quote stays: "Help!" cried the fox.
    seen = set()
    for sentence in sentences:
        said = " ".join(sentence.lower().split())
        if said in seen or said.startswith("also seen:"):  # a sentence said again (the opening, which the penalties
            continue  # do not see), or the request's "Also seen: microwave." echoed
        seen.add(said)
        n = len(sentence.split())
        if kept and words + n > limit:
            if words < budget * 0.7:
                clause = _clause_within(sentence, int(limit - words))
                if clause:
                    kept.append(clause)
            break
        kept.append(sentence)
        words += n
    story = " ".join(kept).strip()
    if story and not ENDS_SENTENCE.search(story):
        cut = max(story.rfind(ch) for ch in ".!?")
        story = story[: cut + 1] if cut > len(story) // 2 else story.rstrip(" \"'“”‘’,;:-") + "."
    return story.replace(" " + LINE_BREAK, "\n").replace(LINE_BREAK, "") if keep_lines else story


# the writer going on to a photo of its own, as the request does, or to a chat turn of its own
_REQUEST_ECHO = re.compile(r"(^|\s|(?<=[.!?\"”]))((?i:photo|scene|picture) \d+:|Photos?:|(user|assistant|system)\s*\n)")
# what an instruction-tuned writer appends after the story, addressed to the user rather than the reader
_NOTE_TO_USER = re.compile(r"\b(would you like|let me know|me to write|feel free to|i hope you|hope you enjoy(ed)?|"
                           r"here is (your|the) story|here's (your|the) story|paste)\b", re.IGNORECASE)


def _close_quotation(story: str) -> str:
    """A story the word budget stopped inside a quotation ('The boy said: "I am very hungry.') gets its closing mark:
    the speech is over, and an open quote reads as a story cut off mid-word."""
    if story.count('"') % 2 and story.rfind('"') < len(story) - 1:
        return story + '"'
    if story.count("“") > story.count("”"):
        return story + "”"
    return story


def _clause_within(sentence: str, max_words: int) -> str | None:
    """The longest prefix of `sentence` ending at a clause boundary with at most `max_words` words, closed with '.'."""
    best = None
    for match in re.finditer(r"[,;:](?=\s)", sentence):
        prefix = sentence[: match.start()].rstrip()
        if len(prefix.split()) > max_words:
            break
        best = prefix
    return best + "." if best and len(best.split()) >= 4 else None


def settled_text(text: str, budget: int, keep_lines: bool = False) -> str:
    """The part of a growing stream that is final: whole sentences, within the budget's hard limit."""
    finished = _cut(text, budget, keep_lines)
    last_end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if last_end < 0:
        return ""
    settled = _cut(text[: last_end + 1], budget, keep_lines)
    return settled if finished.startswith(settled) else ""
