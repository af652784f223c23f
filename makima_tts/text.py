"""Sentence splitting for text that arrives in pieces (LLM tokens, WebSocket messages).

`SentenceBuffer.push(piece)` returns every sentence that became complete with that piece,
so an engine can start speaking the first sentence while the rest is still being typed;
`flush()` returns whatever is left. `split_sentences(text)` is the same for a whole text.

Rules (pragmatic, for speech: merging two sentences only costs a little latency, while
splitting in the middle of one breaks the prosody, so when in doubt we do not split):

* A sentence ends at `.`, `!`, `?`, `...` or `…` (runs of them, e.g. `?!`), optionally followed by
  closing quotes/brackets, once whitespace follows. At the end of a pushed piece we wait
  for the next character, because `3.` may yet become `3.14`.
* CJK terminators (`。！？；｡`) end a sentence at once, whitespace or not.
* A blank line (paragraph break) ends a sentence even without a terminator.
* No split after titles and Latin abbreviations (`Mr.`, `Dr.`, `e.g.`, `i.e.`, `vs.` ...), single
  capital initials (`J. K. Rowling`) or upper-case dotted acronyms (`U.S.`, `U.K.`).
* After ambiguous abbreviations (`etc.`, `Inc.`, `a.m.`, `No.` ...) and ellipses we look at the
  next non-space character: a lower-case letter or a digit continues the sentence.
  (So `Wait... what?` is one sentence, `I waited... Then it rang.` is two.)
* Decimals (`3.14`) and dotted tokens (`example.com`) never split, as no whitespace follows the dot.
* A run longer than `max_chars` without an end is split at the last comma/semicolon/colon
  in its second half, else at the last space, else hard at `max_chars`.
"""
from __future__ import annotations

import re
from typing import Optional

__all__ = ["SentenceBuffer", "split_sentences", "DEFAULT_MAX_CHARS"]

DEFAULT_MAX_CHARS = 300

_TERMINATORS = ".!?…"
_CJK_TERMINATORS = "。！？；｡"
# Closing quotes and brackets that belong to the sentence they follow.
_CLOSERS = "\"')]}»›’”」』）】〉》〕〗〙〛"
# Opening quotes/brackets that may precede a word (skipped when reading the word before a dot).
_OPENERS = "\"'([{«‹‘“「『（【〈《〔〖〘〚"
_UNAMBIGUOUS_CLOSERS = "".join(c for c in _CLOSERS if c not in _OPENERS)
_SOFT_BREAKS = ",;:，、"

# Never end a sentence (titles, Latin abbreviations): compared lower-case, without the final dot.
_NEVER = frozenset("""
mr mrs ms mx dr prof rev hon fr sr jr st mt gen col capt cpt lt sgt cpl maj adm gov sen rep pres supt insp
e.g eg i.e ie cf vs viz fig figs eq eqs ref refs approx ca
""".split())
# End a sentence only if the next word does not start lower-case or with a digit.
_AMBIGUOUS = frozenset("""
etc inc ltd co corp llc plc bros dept est no nos vol vols pp p ch sec min max hr hrs ft lb lbs oz
jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thur thurs fri sat sun
a.m p.m am pm al esp ave blvd rd
""".split())
_DOTTED = re.compile(r"(?:\w\.)+\w")
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_LOOKAHEAD = 64     # characters read past max_chars to see how a sentence end goes on


def _word_before(buf: str, i: int, start: int = 0) -> str:
    """The word ending just before position i (the dot), without opening quotes/brackets."""
    k = i
    while k > start and not buf[k - 1].isspace():
        k -= 1
    return buf[k:i].lstrip(_OPENERS)


def _dot_kind(word: str) -> str:
    """'never', 'ambiguous' or 'break' for a single '.' after `word`."""
    if not word:
        return "break"
    low = word.lower()
    if low in _NEVER:
        return "never"
    if low in _AMBIGUOUS:
        return "ambiguous"
    if len(word) == 1 and word.isupper():
        return "never"  # an initial: "J. K. Rowling"
    if _DOTTED.fullmatch(word):
        letters = [c for c in word if c.isalpha()]
        if letters and all(c.isupper() for c in letters):
            return "never"  # U.S., U.K., U.N.
        return "ambiguous"  # a.m., p.m., and unknown dotted abbreviations
    return "break"


def _find_end(buf: str, final: bool, start: int = 0, stop: Optional[int] = None) -> tuple[Optional[int], Optional[int]]:
    """Find the first sentence end in buf[start:stop].

    Returns (end, resume): `end` is the index just past the sentence (None if no sentence is
    complete yet); `resume` is where the next sentence's text starts (end for terminators,
    after the newlines for a blank line). With final=True the end of buf counts as whitespace.
    Only buf[start:stop] is read (stop: the end of buf by default), so a caller that bounds it
    bounds the work; `final` applies only when stop is the end of buf.
    """
    n = len(buf) if stop is None else min(stop, len(buf))
    final = final and n == len(buf)
    i = start
    content = False           # a non-space character seen since start (for a blank line to end a sentence)
    while i < n:
        c = buf[i]
        if c in _CJK_TERMINATORS:
            j = i + 1
            while j < n and (buf[j] in _CJK_TERMINATORS or buf[j] in _TERMINATORS or buf[j] in _CLOSERS):
                j += 1
            return j, j
        if c in _TERMINATORS:
            content = True
            j = i
            while j < n and buf[j] in _TERMINATORS:
                j += 1
            run = buf[i:j]
            while j < n and buf[j] in _CLOSERS:
                j += 1
            if j == n:
                return (j, j) if final else (None, None)
            if not buf[j].isspace():
                i = j
                continue
            if "!" in run or "?" in run:
                kind = "break"
            elif "…" in run or len(run) > 1:
                kind = "ambiguous"
            else:
                kind = _dot_kind(_word_before(buf, i, start))
            if kind == "never":
                i = j
                continue
            if kind == "ambiguous":
                k = j
                while k < n and (buf[k].isspace() or buf[k] in _OPENERS):
                    k += 1
                if k == n:
                    return (j, j) if final else (None, None)
                if buf[k].islower() or buf[k].isdigit():
                    i = j
                    continue
            return j, j
        if c == "\n":
            m = _BLANK_LINE.match(buf, i, n)
            if m and content:
                return i, m.end()
        elif not c.isspace():
            content = True
        i += 1
    return None, None


def _safety_cut(buf: str, max_chars: int) -> int:
    """Where to cut a run of more than max_chars characters that has no sentence end."""
    window = buf[:max_chars + 1]
    half = max_chars // 2
    best = -1
    for m in re.finditer(r"[,;:，、](?=\s)|[，、]", window):
        if m.end() >= half and m.end() <= max_chars:
            best = m.end()
    if best > 0:
        return best
    k = window.rfind(" ", 1, max_chars + 1)
    if k > 0:
        return k
    return max_chars


def _is_empty(sentence: str) -> bool:
    """True for text that carries nothing to say: whitespace and closing punctuation only."""
    return not sentence.strip().strip(_CLOSERS + _TERMINATORS + _CJK_TERMINATORS + _SOFT_BREAKS).strip()


def _clean(sentence: str) -> str:
    # A closing bracket can only lead a sentence when it belonged to the previous one, which
    # was handed out before the bracket arrived (CJK terminators end a sentence at once).
    return sentence.strip().lstrip(_UNAMBIGUOUS_CLOSERS).strip()


class SentenceBuffer:
    """Collects streamed text and hands out complete sentences as soon as they are complete."""

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS):
        if max_chars < 2:
            raise ValueError("max_chars must be at least 2")
        self.max_chars = max_chars
        self._buf = ""

    @property
    def pending(self) -> str:
        """Text received but not yet returned as a sentence."""
        return self._buf

    def push(self, piece: str) -> list[str]:
        """Add a piece of text; return the sentences it completed (possibly none)."""
        if not piece:
            return []
        self._buf += piece
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of text: return everything still pending, as sentences."""
        out = self._drain(final=True)
        rest, self._buf = self._buf, ""
        if not _is_empty(rest):
            out.append(_clean(rest))
        return out

    def reset(self) -> None:
        self._buf = ""

    def restore(self, pending: str) -> None:
        """Put back what `pending` was (to undo a push whose sentences were not taken)."""
        self._buf = pending

    def _drain(self, final: bool) -> list[str]:
        # Linear in the buffer: each step reads at most max_chars + _LOOKAHEAD characters past
        # `pos` and moves `pos` past what it hands out, and nothing is copied but the sentences.
        out: list[str] = []
        buf = self._buf
        n = len(buf)
        content_end = len(buf.rstrip())          # past the last non-space character
        limit = self.max_chars
        pos = 0
        while pos < n:
            start = pos
            while start < n and buf[start].isspace():
                start += 1
            if start >= content_end:
                break
            end, resume = _find_end(buf, final, start, start + limit + _LOOKAHEAD)
            if end is not None and end - start <= limit:
                sentence, pos = buf[start:end], resume
            elif content_end - start > limit:
                # Too long without an end: cut at a comma or space.
                cut = start + _safety_cut(buf[start:start + limit + 1], limit)
                sentence, pos = buf[start:cut], cut
            else:
                break
            if not _is_empty(sentence):
                out.append(_clean(sentence))
        rest = buf[pos:]
        if not rest.strip():
            # Keep nothing but, at most, whitespace that separates from the next piece.
            rest = rest[-1:] if rest else ""
        self._buf = rest
        return out


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Split a whole text into sentences (same rules as SentenceBuffer)."""
    buf = SentenceBuffer(max_chars)
    return buf.push(text) + buf.flush()
