"""A Java-free copy of the tokenization that pycocoevalcap runs before scoring captions.

pycocoevalcap's `PTBTokenizer` pipes captions through Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines
-lowerCase`, a JFlex lexer in Java) and then drops the punctuation tokens in `PUNCTUATIONS`. Every published
BLEU/ROUGE-L/CIDEr-D number depends on that exact output, so this module re-implements the lexer's rules that English
text meets (words, contractions, quotes, brackets, numbers, hyphenation, abbreviations and the period they may share
with a sentence end, dashes, ellipses, currency, symbols, URLs, smileys) with the same longest-match semantics:
at each position every rule is tried, the longest match wins (trailing context counts), ties go to the earlier rule.

Rules were checked against the Java tokenizer on every Flickr8k caption and on hand-made tricky sentences (see
tests/test_metrics.py). Not covered: SGML tags, phone numbers, and a few rare abbreviation lists. One deliberate
difference: a caption containing a carriage return or another Unicode line break stays one caption here, while the
Java pipeline splits it and misaligns every later caption.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, compared *after* lower-casing: "-LRB-" never matches "-lrb-",
# so brackets survive as "-lrb-"/"-rrb-" tokens in the reference pipeline, and so they do here.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])

_L = r"[^\W\d_\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u218F\u2460-\u24FF]"  # a letter, not a numeral
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETC = r"(?:['\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\n|\r|\u2028|\u2029|\x0b|\x0c|\x85)"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_WORD = rf"{_L}(?:{_L}|\d)*(?:[.!?]{_L}(?:{_L}|\d)*)*"
_REDAUX = rf"{_APOS}(?i:[msd]|re|ve|ll)"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
_ACRO = r"[A-Za-z](?:\.[A-Za-z])*"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_ALNUM = rf"(?:{_L}|\d)"
_THING = (rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+"
          rf"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?{_ALNUM}+)*")
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|[A-Za-z](?:\.[A-Za-z])+\.))+"
_THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"
_INSENTP = r"[,;:]"
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z])"
# Abbreviations: ABBREV1 may end a sentence (then the period is also returned as its own token when an upper-case
# word follows), ABBREV2 normally precedes a name, ABBREV3 only counts before a number.
_ABBREV1 = (r"(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
            r"|ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt"
            r"|wisc?|wyo|inc|cos?|corp|pp?tys?|ltd|plc|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq"
            r"|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq)\."
            r"|(?:[A](?i:rk)|[I](?i:ll)|[M](?i:ass)|[M](?i:iss)|[O](?i:re)|[W](?i:ash)|[D](?i:el)|[L](?i:a)"
            r"|[P](?i:a)|[T](?i:ex))\.")
_ABTITLE = (r"(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt"
            r"|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det)|[M](?i:iss)")
_ABBREV2 = rf"(?:{_ABTITLE}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas|invt|elec|natl|m[ft]g)|{_ACRO})\."
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|sect?s?|arts?|paras?|bldg|pp|op)\."
_SENTENCE_STARTERS = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last"
                      "|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There"
                      "|These|They|This|We|When|While|What|Yet|You")
_APOWORDS = (  # words with an inner or edge apostrophe that stay whole; one rule each, so the longest wins
    rf"{_APOS}(?i:n){_APOS}?", rf"[lLdDjJ]{_APOS}", rf"(?i:dunkin|somethin|ol){_APOS}", rf"{_APOS}(?i:em)",
    rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*", rf"{_APOS}[2-9]0(?i:s)", rf"{_APOS}(?i:till?)",
    rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*", rf"{_APOS}(?i:cause)",
    r"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
)
_MISCSYMBOL = ("[\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE"
               "\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D"
               "\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u2020-\u2023\u2032-\u2038\u2044\u207A-\u207F"
               "\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F"
               "\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_QUOTE_MAP = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201B": "`", "\u2039": "`", "\u0092": "'",
                            "\u2019": "'", "\u203A": "'", "\u0093": "``", "\u201C": "``", "\u00AB": "``",
                            "\u0094": "''", "\u201D": "''", "\u00BB": "''", '"': "''"})


def _right_quotes(text: str) -> str:
    """PTB3 'latex' quotes for a token that is probably a closing quote or an apostrophe."""
    return text.replace("&apos;", "'").replace("&quot;", '"').translate(_QUOTE_MAP)


def _currency(text: str) -> str:
    return re.sub("[\u0080\u00A4\u20A0\u20AC]", "$", text.replace("\u00A2", "cents").replace("\u00A3", "#"))


def _hyphens(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


def _smiley(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


# An action turns the matched text into (token or None to drop it, number of characters consumed). Consuming less than
# the match "pushes back" the rest to be lexed again, as JFlex's yypushback does.
Action = Callable[[str], tuple[str | None, int]]


def _keep(text: str) -> tuple[str, int]:
    return text, len(text)


def _map(fn: Callable[[str], str]) -> Action:
    return lambda text: (fn(text), len(text))


def _push_back(n: int) -> Action:
    return lambda text: (text[: len(text) - n], len(text) - n)


def _keep_period_for_next(text: str) -> tuple[str, int]:
    """'etc. The' -> 'etc.' then '.': the abbreviation's period also ends the sentence."""
    return text, len(text) - 1


def _drop(text: str) -> tuple[None, int]:
    return None, len(text)


def _acronym_at_sentence_end(text: str) -> tuple[str, int]:
    """'U.S. The' -> 'U.S.' then '.', but 'I. The' -> 'I' then '.'."""
    return (text[:-1], 1) if len(text) == 2 else (text, len(text) - 1)


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern
    action: Action
    has_context: bool  # the pattern ends in (?=(?P<ctx>...)): trailing context, counted in the match length


def _rule(token: str, action: Action = _keep, context: str | None = None) -> _Rule:
    source = f"(?:{token})" + (f"(?=(?P<ctx>{context}))" if context else "")
    return _Rule(re.compile(source), action, context is not None)


_NEWLINE_MARK = "\n"
_RULES: list[_Rule] = [
    _rule(r"(?i:c\+\+|[cf]#)"),
    _rule(r"(?i:cannot)", _push_back(3)),
    _rule(rf"(?i:{_APOS}twas)", _push_back(3)),
    _rule(rf"(?i:{_APOS}tis|gonna|gotta|lemme|gimme|wanna)", _push_back(2)),
    _rule(r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _map(lambda _: "--")),
    _rule(r"(?i:&amp;)", _map(lambda _: "&")),
    _rule(_WORD, context=_REDAUX),
    _rule(r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*", context=_SREDAUX),
    _rule(_WORD),
    *(_rule(word, _map(_right_quotes)) for word in _APOWORDS),
    _rule(rf"(?i:y){_APOS}", context=_L),
    _rule(r"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"),
    _rule(r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
          r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){}$,-_]+\.)+(?i:com|net|org|edu)))"
          r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),
    _rule(r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0]*@(?:[^ \t\n\f\r\"<>|().\u00A0]+\.)+[a-zA-Z]{2,4}"),
    _rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_L}(?:{_L}|\d|_)*(?:{_L}|\d)"),
    _rule(_REDAUX, _map(_right_quotes), context=r"[^A-Za-z]"),
    _rule(_SREDAUX, _map(_right_quotes)),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),
    _rule(rf"[-+]?{_NUM}"),
    _rule(r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", _map(lambda t: t.replace(" ", "\u00A0"))),
    _rule("[\u00BC\u00BD\u00BE\u2153]", _map(lambda t: {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4",
                                                        "\u2153": "1/3"}[t])),
    _rule(rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|cap{_APOS}n"
          rf"|c{_APOS}est)"),
    _rule(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),
    _rule(r"[A-Z]*\$|#"),
    _rule("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", _map(_currency)),
    _rule(rf"{_ACRO}\.", _acronym_at_sentence_end, context=rf"{_SPACENL}+(?:{_SENTENCE_STARTERS})"),
    _rule(_ABBREV1, _keep_period_for_next, context=_SENTEND),
    _rule(_ABBREV1),
    _rule(_ABBREV2),
    _rule(_ABBREV3, context=rf"{_SPACENL}?\d"),
    _rule(_ACRO, context=_SPACENL),
    _rule(rf"{_APOS}\d\d", context=_SPACENL),
    _rule(rf"{_WORD}\.", context=_INSENTP),
    _rule(r'"|&quot;', _map(lambda _: "``"), context=r"[A-Za-z0-9$]"),
    _rule(r'"|&quot;', _map(lambda _: "''")),
    _rule(r"[+%&\u2030\u2031~^|\\]"),
    _rule(r"&lt;|&gt;|[<>]", _map(lambda t: {"&lt;": "<", "&gt;": ">"}.get(t, t))),
    _rule(r"[()\[\]{}]", _map(_BRACKETS.__getitem__)),
    _rule(r"-+", _map(_hyphens)),
    _rule(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", _map(lambda _: "...")),
    _rule(r"@+|#+|_+|\*+|(?:\\\*){1,3}"),
    _rule(r"[,;:]|[?!]+|[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]|=|/"),
    _rule(rf"{_HTHING}\.", context=_INSENTP),
    _rule(_HTHING),
    _rule(rf"{_THING}\.", context=_INSENTP),
    _rule(_THING),
    _rule(rf"{_THINGA}\.", _map(lambda t: re.sub("(?i)&amp;", "&", t)), context=_INSENTP),
    _rule(_THINGA, _map(lambda t: re.sub("(?i)&amp;", "&", t))),
    _rule(r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", _map(_smiley), context="[^A-Za-z0-9]"),
    _rule(r"[\^x=~<>]_[\^x=~<>]"),
    _rule("'", _map(lambda _: "`"), context=r"[A-Za-z][^ \t\n\r\u00A0]"),
    _rule(_REDAUX, _map(_right_quotes)),
    _rule(rf"''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}}"
          rf"|{_APOS}", _map(_right_quotes)),
    _rule(_MISCSYMBOL),
    _rule(rf"{_SPACE}+|[\u200B\u200E\u200F\uFEFF\x00]|&nbsp;", _drop),
    _rule(_NEWLINE, _map(lambda _: _NEWLINE_MARK)),
]


def _lex(text: str) -> list[str]:
    """Raw PTB tokens of `text`, with a newline mark between lines."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        best, best_length = None, 0
        for rule in _RULES:
            match = rule.pattern.match(text, pos)
            if match is None:
                continue
            length = (match.end("ctx") if rule.has_context else match.end()) - pos
            if length > best_length:
                best, best_length = (rule, match.group(0)), length
        if best is None:  # an untokenizable character: the Java lexer deletes it
            pos += 1
            continue
        rule, matched = best
        token, consumed = rule.action(matched)
        if token is not None:
            tokens.append(token)
        pos += consumed
    return tokens


def ptb_tokenize_lines(lines: Iterable[str]) -> list[str]:
    """Tokenize captions exactly as `PTBTokenizer.tokenize` does: one space-joined, lower-cased line per caption.

    The captions are lexed as one text, as the Java tool lexes one file, because a sentence-final abbreviation looks
    at the start of the next line ("etc." before "The ..." also yields a "." token).
    """
    lines = [line.replace("\n", " ") for line in lines]
    if not lines:
        return []
    separated = "\n".join(re.sub(_NEWLINE, " ", line) for line in lines)
    out: list[list[str]] = [[]]
    for token in _lex(separated):
        if token == _NEWLINE_MARK:
            out.append([])
        else:
            lowered = token.lower()
            if lowered not in PUNCTUATIONS:
                out[-1].append(lowered)
    return [" ".join(words) for words in out]


def ptb_tokenize(text: str) -> list[str]:
    """The word tokens pycocoevalcap scores for one sentence (lower-cased, punctuation removed)."""
    (line,) = ptb_tokenize_lines([text])
    return line.split()
