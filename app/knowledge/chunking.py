"""Splitting of documents into chunks that fit the input of the embedding model.

A document is first cut along its structure: sections under Markdown ATX headings or
reStructuredText titles, then paragraphs. A code or literal block is one paragraph together with
its blank lines. The paragraphs of each section are then packed into chunks of at most max_tokens
tokens. Every chunk starts with the heading path of its section, so that its embedding includes
that context, and every chunk after the first of a section repeats the tail of the previous one.

After the heading, a chunk is one contiguous slice of its section, so code keeps its line breaks
and indentation.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass

from app.knowledge.documents import html_to_text
from app.knowledge.sections import Section, parse_sections
from app.knowledge.tokens import TokenCounter

# all-MiniLM-L6-v2 truncates its input at 256 tokens, and [CLS] and [SEP] take two of them.
MODEL_MAX_TEXT_TOKENS = 254
# From 8 on, the text of a chunk has room for at least 3 tokens next to the heading (at most a
# quarter) and the overlap (under half). TokenCounter.split needs 3 for a Hangul syllable.
MIN_MAX_TOKENS = 8

_HEADING_SEPARATOR = " > "
# A sentence ends with . ! or ?, maybe followed by closing quotes or brackets, and then whitespace.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u2019\u201d)\]]*\s+")

_Span = tuple[int, int]


@dataclass(frozen=True)
class Chunk:
    text: str  # the heading path and a blank line if the section has a heading, then a slice of it
    heading: str  # the full heading path, which the start of text may shorten to fit
    token_count: int  # tokens of text, without the model's special tokens
    index: int  # position in the document, from 0


def chunk_document(
    text: str, fmt: str, counter: TokenCounter, max_tokens: int = 200, overlap_tokens: int = 32
) -> list[Chunk]:
    """Split a document of the given format into chunks of at most max_tokens tokens each.

    ``fmt`` is "markdown", "rst", "html" or "text". HTML is converted to Markdown-like text first.
    """
    _check_limits(max_tokens, overlap_tokens)
    if fmt == "html":
        text, fmt = html_to_text(text), "markdown"
    sections = parse_sections(text, fmt)

    pieces: list[tuple[str, str]] = []
    for position, section in enumerate(sections):
        next_titles = sections[position + 1].titles if position + 1 < len(sections) else ()
        # A heading with no text of its own is kept as a chunk unless a subsection repeats it.
        keep_heading_only = next_titles[: len(section.titles)] != section.titles
        packer = SectionPacker(section, counter, max_tokens, overlap_tokens)
        heading = _HEADING_SEPARATOR.join(section.titles)
        pieces.extend((heading, chunk_text) for chunk_text in packer.pack(keep_heading_only))

    counts = counter.count([chunk_text for _, chunk_text in pieces])
    chunks = []
    for (heading, chunk_text), count in zip(pieces, counts, strict=True):
        if count > max_tokens:
            # The packer measures every chunk before emitting it, so this is a bug, not bad input.
            raise RuntimeError(f"chunk {len(chunks)} has {count} tokens, over the limit of {max_tokens}")
        chunks.append(Chunk(text=chunk_text, heading=heading, token_count=count, index=len(chunks)))
    return chunks


def _check_limits(max_tokens: int, overlap_tokens: int) -> None:
    if not MIN_MAX_TOKENS <= max_tokens <= MODEL_MAX_TEXT_TOKENS:
        raise ValueError(
            f"max_tokens is {max_tokens}; it must be between {MIN_MAX_TOKENS} and {MODEL_MAX_TEXT_TOKENS}, "
            "because all-MiniLM-L6-v2 ignores everything after 256 tokens including [CLS] and [SEP]"
        )
    if not 0 <= overlap_tokens < max_tokens / 2:
        raise ValueError(
            f"overlap_tokens is {overlap_tokens}; it must be at least 0 and less than half of "
            f"max_tokens ({max_tokens}), so that every chunk has room for new text"
        )


class SectionPacker:
    """Packer of one section's paragraphs into chunk texts.

    The body is the section's paragraphs joined by blank lines. Units are the smallest slices of
    the body that a chunk may start or end with: whole paragraphs where they fit, else sentences,
    else lines, else pieces cut by the tokenizer. Every unit fits in a chunk together with the
    heading and a full overlap, so packing always makes progress.
    """

    def __init__(self, section: Section, counter: TokenCounter, max_tokens: int, overlap_tokens: int) -> None:
        self._counter = counter
        self._max_tokens = max_tokens
        self._overlap_tokens = overlap_tokens

        # The heading may take at most a quarter of the chunk. A shortened heading would lose
        # words of the document, so the full path is then kept as the first paragraph.
        self._prefix, shortened = _fit_heading(section.titles, counter, max_tokens // 4)
        paragraphs = list(section.paragraphs)
        if shortened:
            paragraphs.insert(0, _HEADING_SEPARATOR.join(section.titles))

        self._body = "\n\n".join(paragraphs)
        paragraph_spans = []
        offset = 0
        for paragraph in paragraphs:
            paragraph_spans.append((offset, offset + len(paragraph)))
            offset += len(paragraph) + 2

        self._prefix_tokens = counter.count([self._prefix])[0]
        self._units = [unit for span in paragraph_spans for unit in self._split(span, 0)]
        sentence_starts = {match.end() for match in _SENTENCE_END.finditer(self._body)}
        self._boundaries = sorted(sentence_starts | {start for start, _ in self._units})

    def pack(self, keep_heading_only: bool) -> list[str]:
        """Return the chunk texts of the section, in order."""
        if not self._units:
            return [self._prefix] if keep_heading_only and self._prefix else []

        texts: list[str] = []
        previous: _Span | None = None
        index = 0
        while index < len(self._units):
            unit = self._units[index]
            start = unit[0] if previous is None else self._overlap_start(previous, unit)
            end = unit[1]
            index += 1
            while index < len(self._units) and self._fits(start, self._units[index][1], self._max_tokens):
                end = self._units[index][1]
                index += 1

            texts.append(self._compose(start, end))
            previous = (start, end)
        return [text for text in texts if text.strip()]

    def _split(self, span: _Span, level: int) -> list[_Span]:
        unit_limit = self._max_tokens - self._overlap_tokens
        if self._fits(*span, unit_limit):
            return [span]

        if level == 0:
            parts = _sentence_spans(self._body, span)
        elif level == 1:
            parts = _line_spans(self._body, span)
        else:
            # The BERT pre-tokenizer splits at whitespace first, so token counts add up across it and a
            # piece of this budget fits after the heading.
            start, end = span
            budget = unit_limit - self._prefix_tokens
            pieces = self._counter.split_spans(self._body[start:end], budget)
            return [(start + piece_start, start + piece_end) for piece_start, piece_end in pieces]

        if len(parts) == 1:
            return self._split(span, level + 1)
        return [unit for part in parts for unit in self._split(part, level + 1)]

    def _overlap_start(self, previous: _Span, unit: _Span) -> int:
        """Return where the next chunk starts: inside the previous chunk, so that it repeats its tail."""
        if self._overlap_tokens == 0:
            return unit[0]
        previous_start, previous_end = previous

        # Whole sentences are preferred, and the longest tail that fits wins. Tails grow as the
        # start moves back, so the search walks back from the end and stops at the first too long.
        first = bisect.bisect_left(self._boundaries, previous_start)
        last = bisect.bisect_left(self._boundaries, previous_end)
        best = None
        for start in reversed(self._boundaries[first:last]):
            if self._counter.count([self._body[start:previous_end]])[0] > self._overlap_tokens:
                break
            if self._fits(start, unit[1], self._max_tokens):
                best = start
        if best is not None:
            return best

        # The last sentence alone is longer than the overlap, so the overlap is its last words.
        tail = self._counter.tail_start(self._body[previous_start:previous_end], self._overlap_tokens)
        start = previous_start + tail
        if start < previous_end and self._fits(start, unit[1], self._max_tokens):
            return start
        return unit[0]

    def _compose(self, start: int, end: int) -> str:
        content = self._body[start:end].strip()
        if not self._prefix:
            return content
        return f"{self._prefix}\n\n{content}"

    def _fits(self, start: int, end: int, limit: int) -> bool:
        return self._counter.count([self._compose(start, end)])[0] <= limit


def _fit_heading(titles: tuple[str, ...], counter: TokenCounter, budget: int) -> tuple[str, bool]:
    """Return the heading path shortened to at most budget tokens, and whether it was shortened."""
    if not titles:
        return "", False

    # Outer titles are dropped first, because the innermost one describes the text most closely.
    for first in range(len(titles)):
        heading = _HEADING_SEPARATOR.join(titles[first:])
        if counter.count([heading])[0] <= budget:
            return heading, first > 0

    pieces = counter.split(titles[-1], budget)
    return (pieces[0] if pieces else ""), True


def _sentence_spans(text: str, span: _Span) -> list[_Span]:
    start, end = span
    cuts = [match.end() for match in _SENTENCE_END.finditer(text, start, end)]
    return _strip_spans(text, [start, *cuts, end])


def _line_spans(text: str, span: _Span) -> list[_Span]:
    start, end = span
    cuts = [position + 1 for position in range(start, end) if text[position] == "\n"]
    return _strip_spans(text, [start, *cuts, end])


def _strip_spans(text: str, cuts: list[int]) -> list[_Span]:
    spans = []
    for start, end in itertools.pairwise(cuts):
        piece = text[start:end]
        if piece.strip():
            leading = len(piece) - len(piece.lstrip())
            trailing = len(piece) - len(piece.rstrip())
            spans.append((start + leading, end - trailing))
    return spans
