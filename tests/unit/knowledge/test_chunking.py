import itertools
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from app.knowledge.chunking import Chunk, chunk_document
from app.knowledge.tokens import TokenCounter, default_token_counter

PEPS = Path(__file__).resolve().parents[2] / "fixtures" / "peps"
PEP_FILES = ["pep-0020.rst", "pep-0257.rst", "pep-0008.rst"]
ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1+\s*$")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return default_token_counter()


@pytest.fixture(scope="module")
def pep8_chunks(counter) -> list[Chunk]:
    return chunk_document(read_pep("pep-0008.rst"), "rst", counter)


def read_pep(name: str) -> str:
    return (PEPS / name).read_text(encoding="utf-8")


def body(chunk: Chunk) -> str:
    """Return the chunk text without the heading line that chunk_document puts in front."""
    prefix, separator, rest = chunk.text.partition("\n\n")
    return rest if separator and chunk.heading.endswith(prefix) else chunk.text


def overlap_length(previous: str, current: str) -> int:
    """Return the length of the longest start of current that is also the end of previous."""
    for length in range(min(len(previous), len(current)), 0, -1):
        if previous.endswith(current[:length]):
            return length
    return 0


def source_words(text: str) -> Counter:
    return Counter(word for line in text.split("\n") if not ADORNMENT.match(line) for word in line.split())


def chunk_words(chunks: list[Chunk]) -> Counter:
    return Counter(word for chunk in chunks for word in chunk.text.split())


@pytest.mark.parametrize("max_tokens", [255, 7, 0])
def test_max_tokens_out_of_range(counter, max_tokens):
    with pytest.raises(ValueError, match=f"max_tokens is {max_tokens}; it must be between 8 and 254"):
        chunk_document("text", "text", counter, max_tokens=max_tokens, overlap_tokens=0)


@pytest.mark.parametrize(("max_tokens", "overlap_tokens"), [(200, 100), (200, 150), (9, 5), (200, -1)])
def test_overlap_out_of_range(counter, max_tokens, overlap_tokens):
    with pytest.raises(ValueError, match=f"overlap_tokens is {overlap_tokens}; it must be at least 0"):
        chunk_document("text", "text", counter, max_tokens=max_tokens, overlap_tokens=overlap_tokens)


def test_largest_limits_accepted(counter):
    chunks = chunk_document("Some text.", "text", counter, max_tokens=254, overlap_tokens=126)

    assert [chunk.text for chunk in chunks] == ["Some text."]


def test_unknown_format(counter):
    with pytest.raises(ValueError, match="unknown document format 'pdf'"):
        chunk_document("text", "pdf", counter)


@pytest.mark.parametrize("text", ["", "  \n\n \t\n"])
def test_empty_text_gives_no_chunks(counter, text):
    assert chunk_document(text, "markdown", counter) == []


def test_markdown_heading_paths(counter):
    text = (
        "Intro before any heading.\n\n"
        "# Guide\n\nGuide text.\n\n"
        "## Install ##\n\nInstall text.\n\n"
        "#### Deep\n\nDeep text.\n\n"
        "## Use\n\nUse text.\n"
    )

    chunks = chunk_document(text, "markdown", counter)

    assert [chunk.heading for chunk in chunks] == [
        "",
        "Guide",
        "Guide > Install",
        "Guide > Install > Deep",
        "Guide > Use",
    ]
    assert [chunk.text for chunk in chunks] == [
        "Intro before any heading.",
        "Guide\n\nGuide text.",
        "Guide > Install\n\nInstall text.",
        "Guide > Install > Deep\n\nDeep text.",
        "Guide > Use\n\nUse text.",
    ]
    assert [chunk.index for chunk in chunks] == [0, 1, 2, 3, 4]


def test_markdown_fenced_code_is_not_split(counter):
    code = "```python\n# a comment, not a heading\n\ndef f():\n\n    return 1\n```"
    text = f"# Title\n\nBefore the code.\n\n{code}\n\nAfter the code.\n"

    chunks = chunk_document(text, "markdown", counter)

    assert len(chunks) == 1
    assert chunks[0].heading == "Title"
    assert code in chunks[0].text


def test_markdown_indented_code_kept_together(counter):
    text = "Intro:\n\n    line one\n\n    line two\n\nAfter.\n"

    chunks = chunk_document(text, "markdown", counter, max_tokens=12, overlap_tokens=0)

    assert any("line one\n\n    line two" in chunk.text for chunk in chunks)


def test_hash_without_space_is_not_heading(counter):
    chunks = chunk_document("#hashtag and #42 are words", "markdown", counter)

    assert [chunk.heading for chunk in chunks] == [""]


def test_text_format_has_no_headings(counter):
    chunks = chunk_document("# Not a heading\n\nTitle\n=====\n\nText.", "text", counter)

    assert [chunk.heading for chunk in chunks] == [""]


def test_rst_title_styles_set_levels(counter):
    text = (
        "=========\nThe Title\n=========\n\nPreamble.\n\n"
        "Part One\n--------\n\nOne.\n\n"
        "Detail\n~~~~~~\n\nDetail text.\n\n"
        "Part Two\n--------\n\nTwo.\n"
    )

    chunks = chunk_document(text, "rst", counter)

    assert [chunk.heading for chunk in chunks] == [
        "The Title",
        "The Title > Part One",
        "The Title > Part One > Detail",
        "The Title > Part Two",
    ]


def test_rst_short_underline_is_not_title(counter):
    chunks = chunk_document("A longer line\n----\n\nText.", "rst", counter)

    assert [chunk.heading for chunk in chunks] == [""]


def test_rst_literal_block_stays_with_introduction(counter):
    text = "Title\n=====\n\nExample::\n\n    first = 1\n\n    second = 2\n\nAfter.\n"

    chunks = chunk_document(text, "rst", counter, max_tokens=24, overlap_tokens=0)

    assert any("Example::\n\n    first = 1\n\n    second = 2" in chunk.text for chunk in chunks)


def test_heading_without_text_kept_only_as_leaf(counter):
    text = "# Parent\n\n## Child\n\nChild text.\n\n## Empty child\n"

    chunks = chunk_document(text, "markdown", counter)

    assert [chunk.text for chunk in chunks] == ["Parent > Child\n\nChild text.", "Parent > Empty child"]


def test_html_converted_then_chunked_as_markdown(counter):
    page = (
        "<html><body><h1>Guide</h1><p>Intro.</p><h2>Steps</h2><ul><li>One</li><li>Two</li></ul></body></html>"
    )

    chunks = chunk_document(page, "html", counter)

    assert [chunk.text for chunk in chunks] == ["Guide\n\nIntro.", "Guide > Steps\n\n- One\n- Two"]


def test_long_paragraph_split_at_sentences(counter):
    sentences = [f"Sentence number {number} talks about topic {number}." for number in range(30)]

    chunks = chunk_document(" ".join(sentences), "text", counter, max_tokens=40, overlap_tokens=0)

    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.token_count <= 40
        assert chunk.text.startswith("Sentence number")
        assert chunk.text.endswith(".")


def test_long_sentence_split_by_tokens(counter):
    sentence = " ".join(f"word{number}" for number in range(200))

    chunks = chunk_document(sentence, "text", counter, max_tokens=30, overlap_tokens=0)

    assert len(chunks) > 1
    assert max(chunk.token_count for chunk in chunks) <= 30
    assert " ".join(chunk.text for chunk in chunks).split() == sentence.split()


def test_hangul_within_smallest_limit(counter):
    # A Hangul syllable takes up to three tokens, so these six-syllable words must be cut inside.
    text = "# 한국어\n\n" + "한국어한국어 " * 20

    chunks = chunk_document(text, "markdown", counter, max_tokens=8, overlap_tokens=3)

    assert len(chunks) > 1
    assert max(chunk.token_count for chunk in chunks) <= 8


def test_overlap_prefers_whole_sentences(counter):
    sentences = [f"Fact {number} is short." for number in range(40)]

    chunks = chunk_document(" ".join(sentences), "text", counter, max_tokens=40, overlap_tokens=12)

    assert len(chunks) > 2
    for previous, current in itertools.pairwise(chunks):
        length = overlap_length(previous.text, current.text)
        assert length > 0
        assert current.text.startswith("Fact")
        assert counter.count([current.text[:length]])[0] <= 12


def test_overlap_takes_last_words_of_long_sentence(counter):
    sentence = " ".join(f"word{number}" for number in range(200)) + "."

    chunks = chunk_document(sentence, "text", counter, max_tokens=30, overlap_tokens=5)

    for previous, current in itertools.pairwise(chunks):
        length = overlap_length(previous.text, current.text)
        assert length > 0
        assert counter.count([current.text[:length]])[0] <= 5


def test_overlap_stays_within_section(counter):
    text = "# One\n\n" + "First section sentence. " * 30 + "\n\n# Two\n\nSecond section text.\n"

    chunks = chunk_document(text, "markdown", counter, max_tokens=40, overlap_tokens=10)

    assert chunks[-1].text == "Two\n\nSecond section text."


def test_long_heading_shortened_but_kept(counter):
    title = " ".join(f"heading{number}" for number in range(40))
    text = f"# Short parent\n\n## {title}\n\nThe text.\n"

    chunks = chunk_document(text, "markdown", counter, max_tokens=32, overlap_tokens=4)

    assert chunks[0].heading == f"Short parent > {title}"
    assert max(chunk.token_count for chunk in chunks) <= 32
    heading_line = chunks[0].text.split("\n\n")[0]
    assert counter.count([heading_line])[0] <= 32 // 4
    assert set(title.split()) <= set(chunk_words(chunks))
    assert "The text." in chunks[-1].text


@pytest.mark.parametrize(("max_tokens", "overlap_tokens"), [(200, 32), (64, 16), (254, 0), (8, 3), (32, 15)])
def test_pep8_chunks_never_exceed_limit(counter, max_tokens, overlap_tokens):
    chunks = chunk_document(read_pep("pep-0008.rst"), "rst", counter, max_tokens, overlap_tokens)

    assert chunks
    for chunk in chunks:
        assert chunk.token_count <= max_tokens
        assert counter.count([chunk.text]) == [chunk.token_count]
        assert chunk.text.strip() == chunk.text
        assert chunk.text
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize("name", PEP_FILES)
@pytest.mark.parametrize(("max_tokens", "overlap_tokens"), [(200, 32), (64, 16)])
def test_pep_no_text_lost(counter, name, max_tokens, overlap_tokens):
    text = read_pep(name)

    chunks = chunk_document(text, "rst", counter, max_tokens, overlap_tokens)

    missing = source_words(text) - chunk_words(chunks)
    assert not missing


def test_pep8_chunks_overlap_within_section(counter, pep8_chunks):
    pairs = [
        (previous, current)
        for previous, current in itertools.pairwise(pep8_chunks)
        if previous.heading == current.heading
    ]
    assert len(pairs) > 10
    for previous, current in pairs:
        length = overlap_length(previous.text, body(current))
        assert length > 0, current.text
        assert counter.count([body(current)[:length]])[0] <= 32


def test_pep_header_is_own_chunk(pep8_chunks):
    chunks = pep8_chunks

    assert chunks[0].heading == "PEP 8 \u2013 Style Guide for Python Code"
    assert chunks[0].text.startswith("PEP 8 \u2013 Style Guide for Python Code\n\nPEP: 8\nTitle: Style Guide")
    assert "Introduction" not in chunks[0].text
    assert chunks[1].heading == "PEP 8 \u2013 Style Guide for Python Code > Introduction"


def test_pep257_subsection_heading(counter):
    chunks = chunk_document(read_pep("pep-0257.rst"), "rst", counter)

    expected = "PEP 257 \u2013 Docstring Conventions > Specification > Multi-line Docstrings"
    matching = [chunk for chunk in chunks if chunk.heading == expected]
    assert matching
    assert all(chunk.text.startswith(expected + "\n\n") for chunk in matching)
    assert any("summary line" in chunk.text for chunk in matching)


def test_pep20_code_block_kept_whole(counter):
    # With its heading the block takes 201 tokens, so it fits a unit of max_tokens - overlap_tokens = 222.
    chunks = chunk_document(read_pep("pep-0020.rst"), "rst", counter, max_tokens=254, overlap_tokens=32)

    zen = [chunk for chunk in chunks if chunk.heading.endswith("> The Zen of Python")]
    assert len(zen) == 1
    assert ".. code-block:: text\n\n    Beautiful is better than ugly." in zen[0].text
    assert zen[0].text.endswith("let's do more of those!")


def test_pep20_long_code_split_at_lines(counter):
    chunks = chunk_document(read_pep("pep-0020.rst"), "rst", counter, max_tokens=100, overlap_tokens=20)

    zen = [chunk for chunk in chunks if chunk.heading.endswith("> The Zen of Python")]
    assert len(zen) > 1
    for chunk in zen:
        assert body(chunk).rstrip().endswith((".", "!"))


def random_markdown(generator: random.Random) -> str:
    words = [
        "alpha",
        "beta",
        "gamma.",
        "delta!",
        "x" * 120,
        "antidisestablishmentarianism" * 2,
        "\u6f22\u5b57",
        "q?",
    ]
    blocks = []
    for _ in range(generator.randint(1, 12)):
        kind = generator.random()
        if kind < 0.2:
            blocks.append(
                "#" * generator.randint(1, 4)
                + " "
                + " ".join(generator.choices(words, k=generator.randint(1, 30)))
            )
        elif kind < 0.3:
            blocks.append(
                "```\n" + "\n\n".join(generator.choices(words, k=generator.randint(1, 40))) + "\n```"
            )
        else:
            blocks.append(" ".join(generator.choices(words, k=generator.randint(1, 150))))
    return "\n\n".join(blocks)


def test_random_markdown_limit_and_completeness(counter):
    generator = random.Random(3)

    for _ in range(15):
        text = random_markdown(generator)
        max_tokens = generator.randint(8, 80)
        overlap_tokens = generator.randint(0, (max_tokens - 1) // 2)

        chunks = chunk_document(text, "markdown", counter, max_tokens, overlap_tokens)

        assert max(chunk.token_count for chunk in chunks) <= max_tokens, (text, max_tokens, overlap_tokens)
        assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
        source_characters = Counter(text.replace("#", "").replace(" ", "").replace("\n", ""))
        chunk_characters = Counter("".join(chunk.text for chunk in chunks).replace(" ", "").replace("\n", ""))
        assert not source_characters - chunk_characters, (text, max_tokens, overlap_tokens)


def test_chunking_is_deterministic(counter):
    text = read_pep("pep-0257.rst")

    assert chunk_document(text, "rst", counter) == chunk_document(text, "rst", counter)
