import random

import pytest

from app.knowledge.tokens import TokenCounter, default_token_counter


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return default_token_counter()


def test_count_excludes_special_tokens(counter):
    assert counter.count(["hello world"]) == [2]


def test_count_batch_keeps_order(counter):
    assert counter.count(["one", "", "   ", "one two three"]) == [1, 0, 0, 3]


def test_count_empty_list(counter):
    assert counter.count([]) == []


def test_count_is_not_truncated_at_128(counter):
    # The shipped tokenizer.json truncates and pads to 128 tokens unless the counter turns that off.
    assert counter.count(["word " * 300]) == [300]


def test_default_counter_is_cached():
    assert default_token_counter() is default_token_counter()


def test_from_model_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TokenCounter.from_model_folder(tmp_path)


def test_split_respects_limit_and_keeps_words(counter):
    text = "The quick brown fox jumps over the lazy dog. " * 20

    pieces = counter.split(text, 7)

    assert len(pieces) > 1
    assert max(counter.count(pieces)) <= 7
    assert " ".join(pieces).split() == text.split()


def test_split_cuts_at_whitespace(counter):
    pieces = counter.split("alpha beta gamma delta epsilon", 2)

    assert pieces == ["alpha beta", "gamma delta", "epsilon"]


def test_split_short_text_is_one_piece(counter):
    assert counter.split("  short text \n", 10) == ["short text"]


def test_split_whitespace_gives_no_pieces(counter):
    assert counter.split(" \n\t ", 10) == []


def test_split_cuts_long_word_between_tokens(counter):
    # Under 100 characters, because WordPiece turns longer words into a single [UNK] token.
    word = "supercalifragilisticexpialidocious" * 2

    pieces = counter.split(word, 3)

    assert len(pieces) > 1
    assert max(counter.count(pieces)) <= 3
    assert "".join(pieces) == word


def test_split_random_text_never_loses_characters(counter):
    generator = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz\u00e9\u00fc\u6f22\u5b57 .,\n"

    for _ in range(200):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 200)))
        max_tokens = generator.randint(1, 12)

        pieces = counter.split(text, max_tokens)

        assert max(counter.count(pieces), default=0) <= max_tokens, (text, max_tokens)
        assert "".join("".join(piece.split()) for piece in pieces) == "".join(text.split()), (
            text,
            max_tokens,
        )


def test_split_word_over_100_characters_is_one_token(counter):
    word = "x" * 150

    assert counter.split(word + " tail", 1) == [word, "tail"]


def test_split_hangul_syllable_takes_three_tokens(counter):
    # The normaliser decomposes each syllable into jamo, so "한국어" takes 8 tokens.
    text = "한국어" * 4

    pieces = counter.split(text, 3)

    assert max(counter.count(pieces)) <= 3
    assert "".join(pieces) == text


def test_split_single_character_over_limit_kept(counter):
    assert counter.split("한", 1) == ["한"]


def test_split_rejects_zero_limit(counter):
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        counter.split("text", 0)


def test_split_spans_point_into_text(counter):
    text = "  first words, then more words  "

    spans = counter.split_spans(text, 3)

    assert [text[start:end] for start, end in spans] == counter.split(text, 3)
    assert spans[0][0] == 2


def test_tail_start_keeps_last_words(counter):
    text = "one two three four five"

    start = counter.tail_start(text, 2)

    assert text[start:] == "four five"


def test_tail_start_whole_text_when_it_fits(counter):
    assert counter.tail_start("one two", 5) == 0


def test_tail_start_long_last_word(counter):
    text = "short " + "x" * 40 + "yz" * 30

    assert counter.tail_start(text, 2) == len(text)
