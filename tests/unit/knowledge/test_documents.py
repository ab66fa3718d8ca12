import codecs
import zipfile
from io import BytesIO

import pytest

from app.errors import DocumentError
from app.knowledge.documents import decode_document, detect_format, html_to_text

LIMIT = 1000

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00"


def zip_bytes() -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "some text")
    return buffer.getvalue()


def test_decode_utf8():
    assert (
        decode_document("notes.md", "caf\u00e9 \u2013 na\u00efve".encode(), LIMIT)
        == "caf\u00e9 \u2013 na\u00efve"
    )


def test_decode_utf8_with_bom():
    assert decode_document("notes.md", codecs.BOM_UTF8 + b"hello", LIMIT) == "hello"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_decode_utf16_with_bom(encoding):
    data = "caf\u00e9\r\nline two".encode(encoding)
    if encoding != "utf-16":
        bom = codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE
        data = bom + data

    assert decode_document("notes.txt", data, LIMIT) == "caf\u00e9\nline two"


def test_decode_normalises_newlines():
    assert decode_document("notes.txt", b"one\r\ntwo\rthree\n", LIMIT) == "one\ntwo\nthree\n"


def test_decode_keeps_tabs_and_form_feeds():
    assert decode_document("notes.txt", b"a\tb\n\x0c\nc", LIMIT) == "a\tb\n\x0c\nc"


def test_decode_limit_is_inclusive():
    assert decode_document("notes.txt", b"x" * LIMIT, LIMIT) == "x" * LIMIT


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "document 'upload.txt' is empty; upload a file that contains text"),
        (b" \n\t\r\n ", "document 'upload.txt' contains only whitespace"),
        (b"x" * (LIMIT + 1), "is 1001 bytes, over the limit of 1000 bytes; split it into smaller documents"),
        ("caf\u00e9".encode("latin-1"), r"not valid UTF-8 \(byte 0xe9 at position 3\); convert it to UTF-8"),
        ("\u00e9t\u00e9".encode("cp1252"), "convert it to UTF-8"),
        ("text".encode("utf-32"), "encoded as UTF-32; convert it to UTF-8"),
        (
            "plain text".encode("utf-16-le"),
            "looks like UTF-16 without a byte order mark; convert it to UTF-8",
        ),
        (codecs.BOM_UTF16_LE, "contains only whitespace"),
        (codecs.BOM_UTF8 + b" \n", "contains only whitespace"),
        (codecs.BOM_UTF16_LE + b"\x00\xd8", "not valid UTF-16 .*; convert it to UTF-8"),
        (PNG_HEADER, "looks like a binary file.*because it contains NUL characters"),
        (b"\x01\x02\x03\x04 text", "because 4 of its 9 bytes are control characters"),
        ("bin\x00\x01ary".encode("utf-16"), "looks like a binary file"),
    ],
)
def test_decode_rejects(data, message):
    with pytest.raises(DocumentError, match=message):
        decode_document("upload.txt", data, LIMIT)


def test_decode_rejects_zip_archive():
    with pytest.raises(DocumentError, match="document 'notes.zip' looks like a binary file"):
        decode_document("notes.zip", zip_bytes(), LIMIT)


def test_document_error_is_value_error():
    with pytest.raises(ValueError):
        decode_document("upload.txt", b"", LIMIT)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("guide.md", "markdown"),
        ("guide.MARKDOWN", "markdown"),
        ("docs/pep-0008.rst", "rst"),
        ("page.html", "html"),
        ("page.HTM", "html"),
        ("notes.txt", "text"),
        ("data.csv", "text"),
        ("README", "text"),
        ("https://example.org/docs/intro.rst?version=2#top", "rst"),
        ("C:\\docs\\guide.md", "markdown"),
    ],
)
def test_detect_format_from_extension(source, expected):
    assert detect_format(source, "plain words") == expected


@pytest.mark.parametrize(
    "text",
    [
        "<!DOCTYPE html><html><body>x</body></html>",
        "\n  <!-- saved page -->\n<html lang='en'>",
        "<HEAD><title>t</title></HEAD>",
        "<body>\n<p>x</p>",
    ],
)
def test_detect_format_sniffs_html_without_extension(text):
    assert detect_format("https://example.org/page", text) == "html"


def test_detect_format_does_not_sniff_known_extension():
    assert detect_format("notes.txt", "<html><body>x</body></html>") == "text"


def test_detect_format_text_mentioning_html():
    assert detect_format("README", "Write <html> at the top of the page.") == "text"


PAGE = """<!DOCTYPE html>
<html>
<head><title>Page title</title><style>p { color: red; }</style></head>
<body>
<nav><a href="/">Home</a> <a href="/docs">Docs</a></nav>
<!-- generated -->
<h1>Install   guide</h1>
<p>First
   paragraph with <b>bold</b> and <a href="#">a link</a>.</p>
<script>console.log("hidden");</script>
<h2>Steps</h2>
<ul>
  <li>Download the archive</li>
  <li>Unpack it<ul><li>on Linux: tar</li></ul></li>
</ul>
<h3>Example</h3>
<pre>def main():
    return 0  # ``` inside code
</pre>
<table><caption>Versions</caption><tr><th>Name</th><th>Version</th></tr><tr><td>tool</td><td>1.2</td></tr></table>
<div>Last&nbsp;line<br>after a break</div>
</body>
</html>"""


@pytest.fixture(scope="module")
def page_text() -> str:
    return html_to_text(PAGE)


def test_html_drops_head_script_style_nav(page_text):
    assert "Page title" not in page_text
    assert "color" not in page_text
    assert "hidden" not in page_text
    assert "Home" not in page_text
    assert "generated" not in page_text


def test_html_headings_become_markdown(page_text):
    lines = page_text.split("\n")

    assert "# Install guide" in lines
    assert "## Steps" in lines
    assert "### Example" in lines


def test_html_paragraph_whitespace_collapsed(page_text):
    assert "\n\nFirst paragraph with bold and a link.\n\n" in page_text


def test_html_list_items_on_own_lines(page_text):
    assert "- Download the archive\n- Unpack it\n  - on Linux: tar" in page_text


def test_html_pre_kept_as_fenced_code(page_text):
    assert "````\ndef main():\n    return 0  # ``` inside code\n````" in page_text


def test_html_table_rows(page_text):
    assert "Versions\nName | Version\ntool | 1.2" in page_text


def test_html_line_break_and_nbsp(page_text):
    assert page_text.endswith("Last line\nafter a break\n")


def test_html_without_text():
    assert html_to_text("<html><head><title>x</title></head><body><script>1</script></body></html>") == ""


def test_html_fragment():
    assert html_to_text("plain <i>inline</i> text") == "plain inline text\n"
