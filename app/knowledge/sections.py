"""Cutting a document into sections along its structure, and sections into paragraphs.

Sections are found under Markdown ATX headings and reStructuredText titles (underlined, or
over- and underlined, with a repeated punctuation character), and a PEP's header fields form
a section of their own. A code or literal block stays one paragraph together with its blank
lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    titles: tuple[str, ...]  # the heading path, outermost first
    paragraphs: tuple[str, ...]


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE_OPENING = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A reStructuredText adornment is a line of one repeated punctuation character.
_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1+\s*$")
_PEP_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):(?:[ \t]+(.*))?$")
_RST_EXPLICIT_MARKUP = re.compile(r"^\s*\.\.(?:\s|$)")


def parse_sections(text: str, fmt: str) -> list[Section]:
    lines = text.split("\n")
    if fmt == "markdown":
        return _parse_markdown(lines)
    if fmt == "rst":
        return _parse_rst(lines)
    if fmt == "text":
        builder = SectionBuilder()
        for line in lines:
            if line.strip():
                builder.add_line(line)
            else:
                builder.end_paragraph()
        return builder.finish()
    raise ValueError(f"unknown document format {fmt!r}; use markdown, rst, html or text")


class SectionBuilder:
    def __init__(self) -> None:
        self._sections: list[tuple[tuple[str, ...], list[str]]] = [((), [])]
        self._lines: list[str] = []

    @property
    def in_paragraph(self) -> bool:
        return bool(self._lines)

    def start_section(self, titles: tuple[str, ...]) -> None:
        self.end_paragraph()
        self._sections.append((tuple(title for title in titles if title), []))

    def add_line(self, line: str) -> None:
        # Blank lines are kept only inside a paragraph, where they belong to a code block.
        if line.strip() or self._lines:
            self._lines.append(line)

    def end_paragraph(self) -> None:
        if self._lines:
            self._sections[-1][1].append("\n".join(self._lines).rstrip())
        self._lines = []

    def finish(self, merge: Callable[[list[str]], list[str]] = list) -> list[Section]:
        self.end_paragraph()
        return [
            Section(titles, tuple(merge(paragraphs)))
            for titles, paragraphs in self._sections
            if titles or paragraphs
        ]


def _parse_markdown(lines: list[str]) -> list[Section]:
    builder = SectionBuilder()
    open_headings: list[tuple[int, str]] = []
    fence = ""

    for line in lines:
        # Inside a fenced code block, blank lines and "#" comments are code.
        if fence:
            builder.add_line(line)
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = ""
            continue

        opening = _FENCE_OPENING.match(line)
        heading = _ATX_HEADING.match(line)
        if opening:
            fence = opening.group(1)
            builder.add_line(line)
        elif heading:
            level = len(heading.group(1))
            title = _ATX_CLOSING.sub("", heading.group(2) or "").strip()
            while open_headings and open_headings[-1][0] >= level:
                open_headings.pop()
            open_headings.append((level, title))
            builder.start_section(tuple(title for _, title in open_headings))
        elif line.strip():
            builder.add_line(line)
        else:
            builder.end_paragraph()

    return builder.finish(_merge_indented_code)


def _merge_indented_code(paragraphs: list[str]) -> list[str]:
    # An indented code block with blank lines in it arrives as several indented paragraphs.
    merged: list[str] = []
    for paragraph in paragraphs:
        if merged and _is_indented_code(paragraph) and _is_indented_code(merged[-1]):
            merged[-1] += "\n\n" + paragraph
        else:
            merged.append(paragraph)
    return merged


def _is_indented_code(paragraph: str) -> bool:
    return all(line.startswith(("    ", "\t")) for line in paragraph.split("\n") if line.strip())


def _parse_rst(lines: list[str]) -> list[Section]:
    builder = SectionBuilder()
    document_title, position = _read_pep_header(lines, builder)
    root = (document_title,) if document_title else ()
    # The reStructuredText specification ("Sections") sets the levels by the order in which adornment
    # styles first appear. An overlined title has another style than the same character underlined only.
    styles: list[tuple[str, bool]] = []
    open_titles: list[str] = []

    while position < len(lines):
        title = None if builder.in_paragraph else _read_rst_title(lines, position)
        if title is None:
            line = lines[position]
            if line.strip():
                builder.add_line(line)
            else:
                builder.end_paragraph()
            position += 1
            continue

        text, style, line_count = title
        if style not in styles:
            styles.append(style)
        level = styles.index(style)
        open_titles = [*open_titles[:level], text]
        builder.start_section((*root, *open_titles))
        position += line_count

    return builder.finish(_merge_literal_blocks)


def _read_rst_title(lines: list[str], position: int) -> tuple[str, tuple[str, bool], int] | None:
    """Return the title at this line, its adornment style and its line count, or None.

    A title is a line underlined, and maybe also overlined, by an adornment at least as long.
    """
    window = [*lines[position : position + 3], "", "", ""]
    overline = _ADORNMENT.match(window[0])
    if overline and window[1].strip() and not _ADORNMENT.match(window[1]):
        title = window[1].strip()
        if window[2].rstrip() == window[0].rstrip() and len(window[2].rstrip()) >= len(title):
            return title, (overline.group(1), True), 3

    underline = _ADORNMENT.match(window[1])
    first = window[0]
    if underline and first.strip() and not first[0].isspace() and not _ADORNMENT.match(first):
        if len(window[1].rstrip()) >= len(first.rstrip()):
            return first.strip(), (underline.group(1), False), 2
    return None


def _read_pep_header(lines: list[str], builder: SectionBuilder) -> tuple[str, int]:
    """Add the header of a PEP, the field lines such as "PEP: 8" at the top, as a section of its own.

    Returns the document title built from the header and the position after it, or ("", 0) when
    the document does not start with such a header.
    """
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1

    fields: dict[str, str] = {}
    for line in lines[start:end]:
        field = _PEP_FIELD.match(line)
        if field:
            fields[field.group(1).lower()] = (field.group(2) or "").strip()
        elif not (fields and line[0].isspace()):
            return "", 0
    if "pep" not in fields and "title" not in fields:
        return "", 0

    number, title = fields.get("pep", ""), fields.get("title", "")
    document_title = f"PEP {number} \u2013 {title}" if number and title else title or f"PEP {number}"
    builder.start_section((document_title,))
    for line in lines[start:end]:
        builder.add_line(line)
    return document_title, end


def _merge_literal_blocks(paragraphs: list[str]) -> list[str]:
    # A paragraph ending in "::" and a directive such as ".. code-block::" own the indented
    # paragraphs after them, blank lines included, so a code example stays with its introduction.
    merged: list[str] = []
    owner_indent: int | None = None
    for paragraph in paragraphs:
        indent = len(paragraph) - len(paragraph.lstrip(" \t"))
        if merged and owner_indent is not None and indent > owner_indent:
            merged[-1] += "\n\n" + paragraph
            continue

        merged.append(paragraph)
        opens_block = paragraph.rstrip().endswith("::") or _RST_EXPLICIT_MARKUP.match(paragraph)
        owner_indent = indent if opens_block else None
    return merged
