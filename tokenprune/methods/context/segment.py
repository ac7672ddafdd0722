"""Sentence segmentation of retrieved passages.

Uses `sentencex <https://pypi.org/project/sentencex/>`_ (Wikimedia; rule-based, ~300 languages
through language fallback chains, abbreviation lists per language, a compiled core that segments
a 10 kB passage in well under a millisecond, no model download). It handles the cases a regex
gets wrong ("e.g.", "U.S.", "Dr.", decimals, ellipses) and returns character offsets, so kept
sentences are cut out of the original text verbatim. pysbd (the other well-known rule-based
segmenter) gives the same splits on our test cases but is unmaintained since 2021 and about
500x slower; NLTK's punkt needs a data download that a fresh offline machine cannot make.

sentencex's own cost grows with (sentences x text length) on CJK text (a 1,000,000-character
Japanese passage took 247 s in one call, 2.7 s in windows; benchmarks/rag/cost.py), so texts longer than
:data:`WINDOW_CHARS` are segmented window by window: linear time, memory bounded by the window.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Sentence", "split_sentences", "WINDOW_CHARS"]

#: texts longer than this are segmented in windows of this many characters (see :func:`_starts`).
WINDOW_CHARS = 8192
#: a boundary is taken from a window only if the segmenter saw this many characters on both sides.
_CONTEXT = 256


@dataclass(frozen=True)
class Sentence:
    """One sentence of a passage: ``text == passage[start:end]``.

    Spans tile the passage: the first starts at 0, each ends where the next starts and the last
    ends at ``len(passage)``, so the whitespace after a sentence belongs to it and joining every
    sentence gives back the passage exactly.
    """

    text: str
    start: int
    end: int


def split_sentences(text: str, language: str = "en") -> list[Sentence]:
    """Split ``text`` into sentences whose spans tile it (see :class:`Sentence`).

    Whitespace-only text gives no sentence; a text without sentence breaks gives one sentence;
    whitespace-only segments (paragraph breaks) are attached to the sentence before them.

    Args:
        text: the passage.
        language: ISO 639 code for the abbreviation rules; unknown codes fall back to English.
    """
    if not isinstance(text, str):
        raise TypeError(f"passage text must be a str, got {type(text).__name__}")
    if not text.strip():
        return []
    starts = _starts(text, language)
    if not starts:  # the segmenter found only whitespace segments: treat the text as one sentence
        starts = [0]
    starts[0] = 0  # leading whitespace belongs to the first sentence
    ends = starts[1:] + [len(text)]
    return [Sentence(text[s:e], s, e) for s, e in zip(starts, ends)]


def _segment_starts(text: str, language: str) -> list[int]:
    """Start offsets of the non-blank segments sentencex finds in ``text`` (one call)."""
    import sentencex

    return [
        b["start_index"]
        for b in sentencex.get_sentence_boundaries(language, text)
        if text[b["start_index"] : b["end_index"]].strip()
    ]


def _starts(text: str, language: str) -> list[int]:
    """Sentence start offsets of ``text``, segmented in windows of about :data:`WINDOW_CHARS` characters.

    A boundary is taken from a window only where the segmenter saw at least ``_CONTEXT``
    characters on both sides of it (or the text's own start), so each is decided with the context a
    whole-text call gives it: consecutive windows overlap by at least ``_CONTEXT`` characters and
    each starts at a sentence start. Where no sentence starts in the overlap band (a sentence longer
    than a window), the window widens. The splits equal sentencex's on the whole text
    (tests/test_context_pruner.py compares them on adversarial text).
    """
    if len(text) <= WINDOW_CHARS:
        return _segment_starts(text, language)
    starts: list[int] = []
    pos, done, window = 0, 0, WINDOW_CHARS  # ``done``: boundaries before it are final
    while pos + window < len(text):
        found = _segment_starts(text[pos : pos + window], language)
        lo, hi = done - pos, window - _CONTEXT
        # the next window starts at a sentence start far enough back that its first _CONTEXT
        # characters (decided here) are discarded there, and near enough to advance half a window
        handoff = [s for s in found if max(1, hi - window // 2) <= s <= hi - _CONTEXT]
        if not handoff:
            window *= 2
            continue
        starts += [pos + s for s in found if lo <= s < hi]
        pos, done, window = pos + handoff[-1], pos + hi, WINDOW_CHARS
    return starts + [pos + s for s in _segment_starts(text[pos:], language) if pos + s >= done]
