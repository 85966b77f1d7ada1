"""Learn CLIP-style byte-level BPE merges from captions, and write them as Hugging Face tokenizer files.

Shape legend: none (no arrays); "word" below is one pre-tokenized, byte-mapped piece of a caption.

``train_bpe`` cleans and splits each caption exactly as ``CLIPTokenizer`` does (NFC, whitespace, lowercase,
CLIP's pattern, UTF-8 bytes -> ``bytes_to_unicode`` characters, ``</w>`` on the last symbol), counts the
distinct words, and then repeatedly merges the most frequent adjacent symbol pair. The vocabulary follows
CLIP's layout: the 256 byte symbols, the same 256 with ``</w>``, one entry per merge (in merge order), then
``<|startoftext|>`` and ``<|endoftext|>``. docs/clip.md, "How train_bpe learns merges", walks
through it.

Determinism: the pair merged next has the highest count; among equal counts, the smallest
``(id of left symbol, id of right symbol)`` in the vocabulary being built (byte symbols first, in
``bytes_to_unicode`` order, then merged symbols in creation order). The result depends only on the multiset
of captions, not on their order.

Speed: pair counts are kept incrementally. Each merge revisits only the words that contain the pair (an
index pair -> words), and a max-heap of counts with lazy re-validation picks the next pair, so no step
rescans the corpus.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from typing import Iterable

from npdiffusion.models.clip.tokenizer import (
    END_OF_WORD,
    CLIPTokenizer,
    byte_map,
    bytes_to_unicode,
    normalize_text,
    pre_tokenize,
    split_pattern,
)

__all__ = ["train_bpe", "save_bpe_files", "MAX_VOCAB_SIZE", "MIN_VOCAB_SIZE"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MIN_VOCAB_SIZE = 256 + 256 + 2
# transformers 4.x reads at most 49152 - 256 - 2 = 48894 merges (the slice [1:48895] of merges.txt); keeping
# vocabularies at or below CLIP's 49,408 entries keeps every merge visible to both 4.x and 5.x.
MAX_VOCAB_SIZE = 49408
_MAX_MERGES = 49152 - 256 - 2
_SPECIALS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")


def _count_words(corpus: Iterable[str]) -> Counter:
    """Distinct byte-mapped words of the corpus with their counts (special-token literals cut out)."""
    if isinstance(corpus, str):
        raise TypeError("train_bpe: corpus must be an iterable of str (captions), got a single str")
    pattern = split_pattern()
    counts: Counter = Counter()
    for i, text in enumerate(corpus):
        if not isinstance(text, str):
            raise TypeError(f"train_bpe: corpus[{i}] must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"train_bpe: corpus[{i}] is not valid Unicode (it holds a lone surrogate)") from None
        for segment in _SPECIALS.split(text):
            if segment:
                counts.update(byte_map(p) for p in pre_tokenize(normalize_text(segment), pattern))
    return counts


def train_bpe(corpus: Iterable[str], vocab_size: int, min_frequency: int = 2
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn up to ``vocab_size - 514`` merges from ``corpus``; returns ``(vocab, merges)``.

    Args:
        corpus: captions (any iterable of str, read once).
        vocab_size: size of the returned vocabulary, 514 .. 49,408 (CLIP's); fewer entries come back when
            no pair occurs ``min_frequency`` times any more.
        min_frequency: a pair is merged only if it occurs at least this often (counting repeated words).

    ``vocab`` maps token -> id in CLIP's layout; ``merges`` lists ``(left, right)`` pairs, rank 0 first. If a
    merge spells a token that already exists (``a + bc`` after ``ab + c``), it reuses that id, as
    Hugging Face's trainer does, so the vocabulary then has fewer entries than 514 + merges.
    Pass both to ``CLIPTokenizer(vocab, merges)`` or ``save_bpe_files``.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"train_bpe: vocab_size must be an int in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (512 byte "
                         f"symbols + merges + 2 special tokens), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"train_bpe: min_frequency must be an int >= 1, got {min_frequency!r}")

    symbols = list(bytes_to_unicode().values())
    symbols += [s + END_OF_WORD for s in symbols]
    symbol_id = {s: i for i, s in enumerate(symbols)}

    words: list[list[int]] = []
    freqs: list[int] = []
    for word, count in sorted(_count_words(corpus).items()):
        words.append([symbol_id[c] for c in word[:-1]] + [symbol_id[word[-1] + END_OF_WORD]])
        freqs.append(count)

    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] = pair_count.get(pair, 0) + f
            where.setdefault(pair, set()).add(w)
    # Max-heap on count, then min on (left id, right id). Counts of a pair only fall unless the pair holds
    # the newest symbol, so a stored count is an upper bound: a popped entry whose count is still current
    # is the true best; a stale one is pushed back with its current count.
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(symbols) < vocab_size - 2 and len(merges) < _MAX_MERGES and heap:
        neg, a, b = heapq.heappop(heap)
        current = pair_count.get((a, b), 0)
        if current != -neg:
            if current > 0:
                heapq.heappush(heap, (-current, a, b))
            continue
        if current < min_frequency:
            break
        merged = symbols[a] + symbols[b]
        new = symbol_id.get(merged)
        if new is None:
            new = symbol_id[merged] = len(symbols)
            symbols.append(merged)
        merges.append((symbols[a], symbols[b]))

        touched = set()
        for w in where.pop((a, b)):
            word, f = words[w], freqs[w]
            for pair in zip(word, word[1:]):  # take the word's pairs out ...
                left = pair_count[pair] - f
                if left:
                    pair_count[pair] = left
                else:
                    del pair_count[pair]
                s = where.get(pair)
                if s is not None:
                    s.discard(w)
                    if not s:
                        del where[pair]
            out, i, n = [], 0, len(word)
            while i < n:  # ... merge every (a, b), left to right, without overlaps ...
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out
            for pair in zip(out, out[1:]):  # ... and put the new word's pairs back
                pair_count[pair] = pair_count.get(pair, 0) + f
                where.setdefault(pair, set()).add(w)
                if new in pair:
                    touched.add(pair)
        for pair in sorted(touched):
            heapq.heappush(heap, (-pair_count[pair], pair[0], pair[1]))

    vocab = {s: i for i, s in enumerate(symbols)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def save_bpe_files(folder, vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int = 77
                   ) -> list[str]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``folder``.

    The files load in ``CLIPTokenizer.from_pretrained`` and in ``transformers.CLIPTokenizer.from_pretrained``
    with identical ids. Returns the written paths.
    """
    return CLIPTokenizer(vocab, merges, model_max_length=model_max_length).save_pretrained(folder)
