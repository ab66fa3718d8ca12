"""Conversion of uploaded documents to text: decoding, format detection and HTML extraction.

Every rejection raises DocumentError with a message that names the document and explains how to
fix the upload, because the message is shown to the user who added the document.
"""

from __future__ import annotations

import codecs
import re
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import Comment, Declaration, Doctype, ProcessingInstruction

from app.errors import DocumentError

DocumentFormat = Literal["markdown", "rst", "html", "text"]

_FORMAT_BY_SUFFIX: dict[str, DocumentFormat] = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".txt": "text",
}

# Tab, line feed, form feed and carriage return are common in text files. Any other C0 control
# character or DEL is a sign of binary data.
_CONTROL_CHARACTERS = "".join(chr(code) for code in [*range(0x20), 0x7F] if chr(code) not in "\t\n\f\r")
_CONTROL_BYTES = _CONTROL_CHARACTERS.encode("ascii")
_CONTROL_TABLE = str.maketrans("", "", _CONTROL_CHARACTERS)
# NOTE: a guess, not tuned on real uploads. Binary files without NUL bytes are rare, and text
# files rarely contain even one of these characters.
_MAX_CONTROL_RATIO = 0.1

_HTML_START = re.compile(
    r"\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)[\s>]", re.IGNORECASE | re.DOTALL
)


def decode_document(source: str, data: bytes, max_bytes: int) -> str:
    """Decode an uploaded document to text with newlines normalised to \\n.

    Accepts UTF-8 with or without a byte order mark, and UTF-16 with a byte order mark. Raises
    DocumentError for an empty, oversized or binary document and for any other encoding.
    """
    if not data:
        raise DocumentError(f"document {source!r} is empty; upload a file that contains text")
    if len(data) > max_bytes:
        raise DocumentError(
            f"document {source!r} is {len(data)} bytes, over the limit of {max_bytes} bytes; "
            "split it into smaller documents"
        )

    text = _decode(source, data)

    if not text.strip():
        raise DocumentError(f"document {source!r} contains only whitespace; upload a file that contains text")
    _reject_binary(source, text)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(source: str, data: bytes) -> str:
    # UTF-32 byte order marks begin with the UTF-16 ones, so they are checked first.
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise DocumentError(
            f"document {source!r} is encoded as UTF-32; convert it to UTF-8 and upload it again"
        )

    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DocumentError(
                f"document {source!r} starts with a UTF-16 byte order mark but is not valid UTF-16 "
                f"({exc.reason} at byte {exc.start}); convert it to UTF-8 and upload it again"
            ) from exc

    # ASCII text in UTF-16 has a NUL byte in every other position.
    half = len(data) // 2
    if half and max(data[0::2].count(0), data[1::2].count(0)) > 0.9 * half:
        raise DocumentError(
            f"document {source!r} looks like UTF-16 without a byte order mark; "
            "convert it to UTF-8 and upload it again"
        )

    # Binary files such as images and archives are recognised before decoding, so that they get
    # this message and not the one about the encoding.
    _reject_binary(source, data)

    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Guessing a legacy encoding such as Latin-1 would always succeed and could silently
        # store wrong characters, so the user is asked to convert the file.
        raise DocumentError(
            f"document {source!r} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at position {exc.start}); "
            "convert it to UTF-8 and upload it again"
        ) from exc


def _reject_binary(source: str, content: str | bytes) -> None:
    if isinstance(content, bytes):
        unit = "bytes"
        has_null = b"\x00" in content
        control_count = len(content) - len(content.translate(None, _CONTROL_BYTES))
    else:
        unit = "characters"
        has_null = "\x00" in content
        control_count = len(content) - len(content.translate(_CONTROL_TABLE))

    if has_null:
        reason = "it contains NUL characters"
    elif control_count / len(content) > _MAX_CONTROL_RATIO:
        reason = f"{control_count} of its {len(content)} {unit} are control characters"
    else:
        return
    raise DocumentError(
        f"document {source!r} looks like a binary file, such as an image or an archive, because {reason}; "
        "upload a plain text, Markdown, reStructuredText or HTML file"
    )


def detect_format(source: str, text: str) -> DocumentFormat:
    """Return the format of a document from the extension of its name.

    ``source`` may be a file name, a path or a URL, whose query and fragment are ignored. A name
    without a known extension gives "html" if the text starts like an HTML page, else "text".
    """
    path = urlsplit(source).path if "://" in source else source
    suffix = PurePosixPath(path.replace("\\", "/")).suffix.lower()
    if suffix in _FORMAT_BY_SUFFIX:
        return _FORMAT_BY_SUFFIX[suffix]

    if _HTML_START.match(text):
        return "html"
    return "text"


_DROPPED_TAGS = ["script", "style", "nav", "head", "noscript", "template"]
_HEADING_LEVELS = {f"h{level}": level for level in range(1, 7)}
_LIST_TAGS = frozenset({"ul", "ol", "menu"})
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "div", "dl",
        "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html", "main",
        "p", "section", "summary",
    }
)  # fmt: skip
_SKIPPED_STRINGS = (Comment, Declaration, Doctype, ProcessingInstruction)


def html_to_text(html: str) -> str:
    """Extract the readable text of an HTML page as Markdown-like text.

    Scripts, styles, navigation and the head are dropped. Headings become ``#`` headings, each
    paragraph, table row and list item gets its own line, and <pre> blocks become fenced code
    blocks with their whitespace kept. Elsewhere runs of whitespace collapse to one space.
    """
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()

    writer = _TextWriter()
    writer.visit(soup)
    writer.flush()
    return writer.text()


class _TextWriter:
    """Collector of the text blocks of an HTML tree, in document order."""

    def __init__(self) -> None:
        self._blocks: list[tuple[str, str]] = []  # (separator before the block, block)
        self._inline: list[str] = []
        self._list_depth = 0
        self._in_list_item = False
        self._after_line_break = False

    def text(self) -> str:
        if not self._blocks:
            return ""
        joined = "".join(separator + block for separator, block in self._blocks)
        return joined.lstrip("\n") + "\n"

    def visit(self, node: Tag) -> None:
        for child in node.children:
            if isinstance(child, _SKIPPED_STRINGS):
                continue
            if isinstance(child, NavigableString):
                self._inline.append(str(child))
            elif isinstance(child, Tag):
                self._visit_tag(child)

    def flush(self) -> None:
        text = _collapse("".join(self._inline))
        self._inline.clear()
        if not text:
            return

        if self._in_list_item:
            # Only the first block of a list item gets the bullet, and the items of a list stay
            # on consecutive lines so that the list reads as one paragraph.
            indent = "  " * (self._list_depth - 1)
            self._blocks.append(("\n", f"{indent}- {text}"))
            self._in_list_item = False
        else:
            # A <br> continues the paragraph on the next line.
            separator = "\n" if self._after_line_break else "\n\n"
            self._blocks.append((separator, text))
        self._after_line_break = False

    def _visit_tag(self, tag: Tag) -> None:
        name = tag.name
        if name in _HEADING_LEVELS:
            self.flush()
            self._add_block("#" * _HEADING_LEVELS[name] + " " + _collapse(tag.get_text()))
        elif name == "pre":
            self.flush()
            self._add_block(_fence(tag.get_text()))
        elif name == "br":
            self.flush()
            self._after_line_break = True
        elif name == "table":
            self.flush()
            self._add_block(_table_text(tag))
        elif name == "li":
            self.flush()
            self._in_list_item = True
            self.visit(tag)
            self.flush()
            self._in_list_item = False
        elif name in _LIST_TAGS:
            self.flush()
            self._list_depth += 1
            self.visit(tag)
            self.flush()
            self._list_depth -= 1
        elif name in _BLOCK_TAGS:
            self.flush()
            self.visit(tag)
            self.flush()
        else:
            self.visit(tag)

    def _add_block(self, block: str) -> None:
        if block.strip("# "):
            self._blocks.append(("\n\n", block))
        self._after_line_break = False


def _table_text(table: Tag) -> str:
    # One line per row with the cells separated by " | ", so that a row reads as one record.
    caption = table.find("caption")
    lines = [_collapse(caption.get_text(" "))] if caption else []
    for row in table.find_all("tr"):
        cells = [_collapse(cell.get_text(" ")) for cell in row.find_all(["td", "th"])]
        lines.append(" | ".join(cell for cell in cells if cell))
    return "\n".join(line for line in lines if line)


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _fence(code: str) -> str:
    # The fence must be longer than any run of backticks inside the code, or it would end early.
    longest_run = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest_run + 1)
    lines = code.strip("\n")
    return f"{fence}\n{lines}\n{fence}"
