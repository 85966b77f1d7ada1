"""CLIP's byte-level BPE tokenizer, id for id equal to ``transformers.CLIPTokenizer`` (transformers 5.x).

Shape legend: ``B`` prompts in a batch, ``L`` tokens per row (``max_length``, 77 for Stable Diffusion).

The pipeline (docs/clip.md, "Byte-level BPE, with a worked example", traces a real prompt):

1. **Added tokens.** The special tokens (``<|startoftext|>``, ``<|endoftext|>``, and the pad token, which is
   ``!`` in Stable Diffusion 2) are cut out of the raw text first; each becomes its own id. Tokens flagged
   ``normalized`` are looked for after step 2 instead, on the cleaned text.
2. **Cleanup** of the text between them: Unicode NFC, every run of whitespace to one space, lowercase
   (character by character, so a final capital sigma becomes ``σ``, not ``ς``).
3. **Pre-tokenization** with CLIP's pattern: the two special-token literals, the contractions
   ``'s 't 're 've 'm 'll 'd``, runs of letters, single digits, runs of other non-space characters.
4. **Byte mapping**: each piece is UTF-8 encoded and each byte replaced by a printable stand-in
   character (``bytes_to_unicode``), so every string is spelled with 256 symbols.
5. **BPE**: the last symbol of each piece gets ``</w>``; adjacent symbols are merged, lowest merge rank
   first (leftmost first among equal ranks), until no listed pair remains; symbols become ids.
6. ``<|startoftext|>`` + ids + ``<|endoftext|>``; batches are truncated (the end token is kept) and padded.

Differences from older transformers (4.x, the Python "slow" tokenizer), which npdiffusion does not follow:
that one cleaned text with ``ftfy.fix_text`` (or a BERT-style fallback without ftfy) instead of NFC and
read at most 48,894 merges from ``merges.txt``; the installed 5.x reference does neither. For vocabularies
of at most 49,408 entries written by ``save_pretrained`` both versions read the same merges.

Unicode tables: character classes come from the ``regex`` package when it is importable, otherwise from
``unicodedata`` through the standard ``re`` module; NFC and lowercasing come from ``unicodedata`` and
``str.lower``. The reference (Rust ``tokenizers``) has its own Unicode tables, so ids can differ only for
code points assigned in a Unicode version newer than the one of the table in use.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import unicodedata
from functools import lru_cache
from itertools import groupby
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from npdiffusion.io.atomic import atomic_write_text

__all__ = ["AddedToken", "CLIPTokenizer", "bytes_to_unicode", "normalize_text", "pre_tokenize", "split_pattern"]

END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
# Unicode White_Space: what the reference's `\s` matches. Python's `\s` and `str.isspace` also match
# U+001C..U+001F, which the reference keeps as punctuation.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
              "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WHITESPACE_RUN = re.compile("[" + re.escape(WHITESPACE) + "]+")
# The reference runs a second, GPT-2 style split after CLIP's; on every piece CLIP's pattern yields it is
# the identity, except on the two special-token literals (reachable as text, e.g. "<|ENDOFTEXT|>"
# lowercased), which it cuts into three pieces.
_LITERAL_PIECES = {"<|startoftext|>": ("<|", "startoftext", "|>"), "<|endoftext|>": ("<|", "endoftext", "|>")}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' attribute order
_VERY_LARGE = 10**9  # model_max_length at or above this means "no limit" (transformers stores int(1e30))


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character map of GPT-2 and CLIP, in CLIP's vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68
    bytes (controls, space, soft hyphen) map to U+0100 upward in byte order. The order of the returned
    dict is the order of the first 256 vocabulary entries.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=None)
def _byte_table() -> dict[int, str]:
    """``str.translate`` table turning a UTF-8 string decoded as Latin-1 into the byte-mapped string."""
    return {b: c for b, c in bytes_to_unicode().items()}


@lru_cache(maxsize=None)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _lowercase(text: str) -> str:
    """Lowercase character by character (the reference has no final-sigma rule; ``str.lower`` does)."""
    if "Σ" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def normalize_text(text: str) -> str:
    """CLIP's cleanup as transformers 5.x does it: NFC, whitespace runs -> one space, lowercase."""
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return _lowercase(text)


@lru_cache(maxsize=None)
def _unicode_class_ranges() -> tuple[str, str]:
    """``re`` character-class bodies for letters (categories L*) and numbers (N*) from ``unicodedata``."""
    major = [unicodedata.category(chr(cp))[0] for cp in range(0x110000)]
    classes = {"L": [], "N": []}
    cp = 0
    for kind, run in groupby(major):
        n = sum(1 for _ in run)
        if kind in classes:
            first, last = re.escape(chr(cp)), re.escape(chr(cp + n - 1))
            classes[kind].append(first if n == 1 else f"{first}-{last}")
        cp += n
    return "".join(classes["L"]), "".join(classes["N"])


@lru_cache(maxsize=None)
def split_pattern(engine: str = "auto"):
    """CLIP's pre-tokenization pattern, compiled with ``regex`` (``\\p{L}``, ``\\p{N}``) or ``re``.

    ``engine``: ``"regex"``, ``"re"`` or ``"auto"`` (``regex`` when importable). Both spell whitespace as
    the explicit Unicode White_Space set above, so the only difference left is the Unicode version of
    their letter/number tables.
    """
    ws = re.escape(WHITESPACE)
    head = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
    if engine == "auto":
        try:
            import regex  # noqa: F401
            engine = "regex"
        except ImportError:
            engine = "re"
    if engine == "regex":
        import regex
        return regex.compile(head + r"\p{L}+|\p{N}|[^" + ws + r"\p{L}\p{N}]+")
    if engine == "re":
        letters, numbers = _unicode_class_ranges()
        return re.compile(head + f"[{letters}]+|[{numbers}]|[^{ws}{letters}{numbers}]+")
    raise ValueError(f"split_pattern: engine must be 'auto', 'regex' or 're', got {engine!r}")


def pre_tokenize(text: str, pattern=None) -> list[str]:
    """Split cleaned text into CLIP's pieces (before byte mapping); whitespace is dropped."""
    pattern = split_pattern() if pattern is None else pattern
    pieces = pattern.findall(text)
    if "<|" in text:
        pieces = [q for p in pieces for q in _LITERAL_PIECES.get(p, (p,))]
    return pieces


def byte_map(piece: str) -> str:
    """UTF-8 bytes of ``piece``, each spelled with its ``bytes_to_unicode`` character."""
    return piece.encode("utf-8").decode("latin-1").translate(_byte_table())


class AddedToken(NamedTuple):
    """A token cut out of the text before BPE (transformers' ``AddedToken`` with the flags CLIP uses).

    ``normalized``: matched on the cleaned (NFC, lowercased) text instead of the raw text.
    ``special``: dropped by ``decode(..., skip_special_tokens=True)``.
    """

    content: str
    normalized: bool = False
    special: bool = True


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"CLIPTokenizer: {what} {path!r} is not valid JSON: {e}") from None


def _read_vocab(vocab) -> dict[str, int]:
    if isinstance(vocab, (str, os.PathLike)):
        vocab = _read_json(os.fspath(vocab), "vocab_file")
    if not isinstance(vocab, dict):
        raise TypeError(f"CLIPTokenizer: vocab_file must be a path to a JSON object or a dict, got {type(vocab).__name__}")
    out = {}
    for token, index in vocab.items():
        if not isinstance(token, str) or isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"CLIPTokenizer: vocab entries must be str -> non-negative int, got {token!r}: {index!r}")
        out[token] = int(index)
    if len(set(out.values())) != len(out):
        raise ValueError("CLIPTokenizer: vocab ids must be unique; some id is used by two tokens")
    return out


def _read_merges(merges) -> list[tuple[str, str]]:
    """Merges from a path (the reference's rules: skip ``#version`` lines, else exactly ``a b``) or a list."""
    if isinstance(merges, (str, os.PathLike)):
        path = os.fspath(merges)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        out = []
        for number, line in enumerate(lines, 1):
            line = line[:-1] if line.endswith("\r") else line
            if line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ValueError(f"CLIPTokenizer: merges_file {path!r} line {number} must be two symbols separated "
                                 f"by one space, got {line!r}")
            out.append((parts[0], parts[1]))
        return out
    if isinstance(merges, (list, tuple)):
        out = []
        for m in merges:
            if isinstance(m, str):
                m = tuple(m.split(" "))
            if (not isinstance(m, (list, tuple)) or len(m) != 2 or not all(isinstance(s, str) and s for s in m)
                    or any(ch in s for s in m for ch in " \n")):
                raise ValueError(f"CLIPTokenizer: each merge must be a pair of non-empty symbols without spaces, got {m!r}")
            out.append((m[0], m[1]))
        return out
    raise TypeError(f"CLIPTokenizer: merges_file must be a path or a list of (a, b) pairs, got {type(merges).__name__}")


class CLIPTokenizer:
    """CLIP's tokenizer: ``encode`` gives ``transformers.CLIPTokenizer(text).input_ids`` exactly.

    Args:
        vocab_file: path to ``vocab.json`` (token -> id), or that dict.
        merges_file: path to ``merges.txt`` (``a b`` per line, lowest rank first, after a ``#version`` header),
            or a list of ``(a, b)`` pairs.
        errors: how ``decode`` treats bytes that are not UTF-8 (``bytes.decode``'s ``errors``).
        unk_token, bos_token, eos_token, pad_token: special tokens (must be in the vocabulary).
        model_max_length: the default ``max_length`` of ``__call__`` (77 positions in CLIP's text model).
        added_tokens: the tokens cut out of the text before BPE, with their flags; by default the four
            special tokens, matched on the raw text. ``from_pretrained`` fills it from the config files.

    See docs/clip.md for the algorithm traced on a prompt.
    """

    def __init__(self, vocab_file, merges_file, errors: str = "replace", unk_token: str = "<|endoftext|>",
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", model_max_length: int = 77,
                 added_tokens: Sequence[AddedToken] | None = None):
        self.encoder = _read_vocab(vocab_file)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merges = _read_merges(merges_file)
        for name, value in (("unk_token", unk_token), ("bos_token", bos_token), ("eos_token", eos_token),
                            ("pad_token", pad_token)):
            if not isinstance(value, str):
                raise TypeError(f"CLIPTokenizer: {name} must be a str, got {type(value).__name__}")
            if value not in self.encoder:
                raise ValueError(f"CLIPTokenizer: {name} {value!r} is not in the vocabulary")
        if not isinstance(errors, str):
            raise TypeError(f"CLIPTokenizer: errors must be a str, got {type(errors).__name__}")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"CLIPTokenizer: model_max_length must be an int >= 2, got {model_max_length!r}")
        self.errors = errors
        self.unk_token, self.bos_token, self.eos_token, self.pad_token = unk_token, bos_token, eos_token, pad_token
        self.unk_token_id = self.encoder[unk_token]
        self.bos_token_id = self.encoder[bos_token]
        self.eos_token_id = self.encoder[eos_token]
        self.pad_token_id = self.encoder[pad_token]
        self.model_max_length = model_max_length

        # (left id, right id) -> (rank, merged id); a later duplicate overrides, as in the reference.
        merge_map = {}
        for rank, (a, b) in enumerate(self.merges):
            for symbol in (a, b, a + b):
                if symbol not in self.encoder:
                    raise ValueError(f"CLIPTokenizer: merge {rank + 1} ({a!r}, {b!r}) needs {symbol!r}, "
                                     "which is not in the vocabulary")
            merge_map[(self.encoder[a], self.encoder[b])] = (rank, self.encoder[a + b])
        self._merge_map = merge_map

        if added_tokens is None:
            added_tokens = [AddedToken(t) for t in (bos_token, eos_token, unk_token, pad_token)]
        resolved: dict[str, AddedToken] = {}
        for tok in added_tokens:
            if not isinstance(tok, AddedToken):
                raise TypeError(f"CLIPTokenizer: added_tokens must hold AddedToken, got {type(tok).__name__}")
            if tok.content not in self.encoder:
                raise ValueError(f"CLIPTokenizer: added token {tok.content!r} is not in the vocabulary")
            resolved.pop(tok.content, None)
            resolved[tok.content] = tok  # the last flags given for a content win, as in the reference
        self.added_tokens = list(resolved.values())
        self.special_ids = frozenset(self.encoder[t.content] for t in self.added_tokens if t.special)
        self._raw_tokens = self._alternation([t.content for t in self.added_tokens if not t.normalized])
        self._norm_tokens = self._alternation([normalize_text(t.content) for t in self.added_tokens if t.normalized])
        self._split = split_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _alternation(contents: list[str]):
        """Leftmost-longest matcher of the given literals (longest first in the alternation)."""
        contents = sorted({c for c in contents if c}, key=lambda c: (-len(c), c))
        return re.compile("|".join(map(re.escape, contents))) if contents else None

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={len(self.encoder)}, merges={len(self.merges)}, "
                f"model_max_length={self.model_max_length})")

    # ---------------------------------------------------------------- encoding
    def bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized ``piece`` (not yet byte-mapped), by lowest-rank-first merging."""
        word = byte_map(piece)
        ids = self._cache.get(word)
        if ids is None:
            ids = self._merge(word)
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, word: str) -> tuple[int, ...]:
        """BPE on a byte-mapped word, step for step as the reference's ``Word::merge_all``.

        Symbols form a linked list; a heap holds candidate merges keyed (rank, position). Popping the
        smallest, a stale entry (its left symbol was absorbed, or the pair changed) is skipped; otherwise the
        pair is merged and the pairs the new symbol forms with its neighbours are pushed.
        """
        enc, unk = self.encoder, self.unk_token_id
        ids = [enc.get(ch, unk) for ch in word[:-1]]
        ids.append(enc.get(word[-1] + END_OF_WORD, unk))
        n = len(ids)
        if n == 1:
            return (ids[0],)
        merges = self._merge_map
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = merges.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            if not alive[pos]:
                continue
            right = nxt[pos]
            if right == -1:
                continue
            m = merges.get((ids[pos], ids[right]))
            if m is None or m[1] != new_id:
                continue
            ids[pos] = new_id
            alive[right] = False
            after = nxt[right]
            nxt[pos] = after
            if after != -1:
                prev[after] = pos
            before = prev[pos]
            if before != -1:
                m = merges.get((ids[before], new_id))
                if m is not None:
                    heapq.heappush(heap, (m[0], before, m[1]))
            if after != -1:
                m = merges.get((new_id, ids[after]))
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
        return tuple(i for i, keep in zip(ids, alive) if keep)

    def _segments(self, text: str) -> Iterable[tuple[bool, str]]:
        """(is_added_token, string) pieces: added tokens cut from raw text, then normalized ones."""
        for is_tok, raw in self._cut(text, self._raw_tokens):
            if is_tok:
                yield True, raw
            else:
                yield from self._cut(normalize_text(raw), self._norm_tokens)

    @staticmethod
    def _cut(text: str, matcher):
        if matcher is None:
            if text:
                yield False, text
            return
        start = 0
        for m in matcher.finditer(text):
            if m.start() > start:
                yield False, text[start:m.start()]
            yield True, m.group()
            start = m.end()
        if start < len(text):
            yield False, text[start:]

    def tokenize_ids(self, text: str) -> list[int]:
        """Content ids of ``text``: no start/end tokens, no truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer: text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"CLIPTokenizer: text must be valid Unicode, got a lone surrogate at {e.start}") from None
        out: list[int] = []
        for is_tok, segment in self._segments(text):
            if is_tok:
                out.append(self.encoder[segment])
            else:
                for piece in pre_tokenize(segment, self._split):
                    out.extend(self.bpe(piece))
        return out

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` (no start/end tokens), e.g. ``['a</w>', 'photo</w>']``."""
        return [self.decoder[i] for i in self.tokenize_ids(text)]

    def encode(self, text: str) -> list[int]:
        """``[bos] + ids + [eos]``, untruncated: ``transformers.CLIPTokenizer(text).input_ids``."""
        return [self.bos_token_id, *self.tokenize_ids(text), self.eos_token_id]

    def __call__(self, texts, max_length: int | None = None, padding: str = "max_length",
                 truncation: bool = True) -> np.ndarray:
        """Token ids of a prompt or a list of prompts, as an int64 array of shape (B, L).

        ``max_length`` defaults to ``model_max_length``. ``padding="max_length"`` makes L = max_length;
        ``"longest"`` pads to the longest row. With ``truncation`` a row keeps its first max_length - 2
        content ids and its end token, as transformers does. A single str gives B = 1.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"CLIPTokenizer: texts must be a str or a list of str, got {type(texts).__name__}")
        max_length = self.model_max_length if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length must be an int >= 2 (room for the start and end "
                             f"tokens), got {max_length!r}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"CLIPTokenizer: padding must be 'max_length' or 'longest', got {padding!r}")
        if not isinstance(truncation, bool):
            raise TypeError(f"CLIPTokenizer: truncation must be a bool, got {type(truncation).__name__}")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"CLIPTokenizer: texts[{i}] must be a str, got {type(text).__name__}")
            ids = self.tokenize_ids(text)
            if len(ids) + 2 > max_length:
                if not truncation:
                    raise ValueError(f"CLIPTokenizer: texts[{i}] has {len(ids) + 2} tokens, more than "
                                     f"max_length={max_length}; pass truncation=True or a larger max_length")
                ids = ids[:max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)  # (B, L)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    # ---------------------------------------------------------------- decoding
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (1-D): bytes joined, ``</w>`` read as a space, ends stripped, as transformers."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"CLIPTokenizer: ids must be a 1-D sequence of ints, got {arr.dtype} with shape {arr.shape}")
        byte_decoder = _byte_decoder()
        chunks = []
        for i in arr.tolist():
            token = self.decoder.get(i)
            if token is None:
                raise ValueError(f"CLIPTokenizer: ids must be in [0, {len(self.encoder)}) and in the vocabulary, got {i}")
            if skip_special_tokens and i in self.special_ids:
                continue
            try:
                chunks.append(bytes(byte_decoder[c] for c in token))
            except KeyError:  # a token spelled outside the byte alphabet is taken as its own UTF-8
                chunks.append(token.encode("utf-8"))
        text = b"".join(chunks).decode("utf-8", errors=self.errors)
        return text.replace(END_OF_WORD, " ").strip()

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None) -> "CLIPTokenizer":
        """Load a ``tokenizer/`` folder: vocab.json, merges.txt, and (optional) tokenizer_config.json and
        special_tokens_map.json for model_max_length, the special tokens and their flags.

        Special tokens are resolved as transformers 5.x does: with ``added_tokens_decoder`` in the config
        those entries define the added tokens; otherwise special_tokens_map.json overrides the config and
        the four tokens are added in the order bos, eos, unk, pad, skipping exact repeats, the last flags
        given for a content winning. Without a ``model_max_length`` the default is 77.
        """
        path = os.fspath(folder)
        if subfolder:
            path = os.path.join(path, subfolder)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIPTokenizer.from_pretrained: folder {path!r} does not exist")
        for name in ("vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"CLIPTokenizer.from_pretrained: {name} is missing from {path!r}")
        config_path = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_path, "tokenizer_config.json") if os.path.isfile(config_path) else {}
        if not isinstance(config, dict):
            raise ValueError(f"CLIPTokenizer.from_pretrained: {config_path!r} must hold a JSON object")

        def spec(value, key, from_map):
            """("str", content) for a plain string, else ("tok", AddedToken) from an AddedToken dict.

            transformers builds dicts from special_tokens_map.json with special=True (so normalized defaults
            to False), other dicts with their own ``special`` (default False, so normalized defaults to True).
            """
            if isinstance(value, str):
                return ("str", value)
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                for flag in ("lstrip", "rstrip", "single_word"):
                    if value.get(flag):
                        raise ValueError(f"CLIPTokenizer.from_pretrained: {key} sets {flag}=true, which this "
                                         "tokenizer does not support")
                special = True if from_map else bool(value.get("special", False))
                return ("tok", AddedToken(value["content"], bool(value.get("normalized", not special)), special))
            raise ValueError(f"CLIPTokenizer.from_pretrained: {key} must be a string or an AddedToken object, got {value!r}")

        defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        values = {k: spec(config[k], k, False) if config.get(k) is not None else ("str", defaults[k])
                  for k in _SPECIAL_KEYS}
        to_add: list[tuple] = []
        decoder = config.get("added_tokens_decoder")
        if decoder:
            if not isinstance(decoder, dict):
                raise ValueError("CLIPTokenizer.from_pretrained: added_tokens_decoder must be a JSON object")
            entries = []
            for i, t in decoder.items():
                if not isinstance(t, dict) or not str(i).isdigit():
                    raise ValueError("CLIPTokenizer.from_pretrained: added_tokens_decoder must map ids to AddedToken "
                                     f"objects, got {i!r}: {t!r}")
                entries.append((int(i), spec(t, f"added_tokens_decoder[{i}]", False)))
            to_add = [s for _, s in sorted(entries, key=lambda e: e[0])]
            by_content = {s[1].content: s for s in to_add}
            values = {k: by_content.get(v[1] if v[0] == "str" else v[1].content, v) for k, v in values.items()}
        else:
            map_path = os.path.join(path, "special_tokens_map.json")
            if os.path.isfile(map_path):
                special_map = _read_json(map_path, "special_tokens_map.json")
                for k in _SPECIAL_KEYS:
                    if isinstance(special_map, dict) and special_map.get(k):
                        values[k] = spec(special_map[k], k, True)
        contents = {(s[1] if s[0] == "str" else s[1].content) for s in to_add}
        for k in _SPECIAL_KEYS:
            v = values[k]
            content = v[1] if v[0] == "str" else v[1].content
            if content not in contents and v not in to_add:
                to_add.append(v)
        names = {k: (v[1] if v[0] == "str" else v[1].content) for k, v in values.items()}
        # Named special tokens are always special (transformers sets the flag after building them).
        added = [AddedToken(s[1]) if s[0] == "str" else s[1]._replace(special=s[1].special or s[1].content in
                                                                      names.values()) for s in to_add]

        max_len = config.get("model_max_length")
        if isinstance(max_len, float) and max_len.is_integer():
            max_len = int(max_len)
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len >= _VERY_LARGE:
            max_len = 77
        errors = config.get("errors", "replace")
        return cls(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), errors=errors,
                   model_max_length=max_len, added_tokens=added, **names)

    def save_pretrained(self, folder) -> list[str]:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``folder``
        (created if needed); ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads them to the same
        ids. The folder is replaced as a whole, atomically (``io.atomic_folder``). Returns the paths.
        """
        from npdiffusion.io.atomic_folder import atomic_folder  # noqa: PLC0415

        folder = os.fspath(folder)
        vocab = dict(sorted(self.encoder.items(), key=lambda kv: kv[1]))
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                 "pad_token": self.pad_token}
        added = {str(self.encoder[t.content]): {"content": t.content, "lstrip": False, "normalized": t.normalized,
                                                "rstrip": False, "single_word": False, "special": t.special}
                 for t in sorted(self.added_tokens, key=lambda t: self.encoder[t.content])}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "errors": self.errors, "do_lower_case": True, "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, **names, "added_tokens_decoder": added}
        contents = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
            "merges.txt": "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(names, indent=2, ensure_ascii=False) + "\n",
        }
        with atomic_folder(folder) as tmp:
            for name in _TOKENIZER_FILES:
                atomic_write_text(os.path.join(tmp, name), contents[name])
        return [os.path.join(folder, name) for name in _TOKENIZER_FILES]
