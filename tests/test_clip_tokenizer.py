"""CLIPTokenizer and train_bpe against transformers' CLIPTokenizer (5.x, backed by Rust `tokenizers`).

The real CLIP vocabulary comes from the `open_clip_torch` wheel (installed with --no-deps), converted to
vocab.json / merges.txt in a session-scoped temporary folder; nothing is downloaded.
"""
import gzip
import importlib.util
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import transformers

from npdiffusion.models.clip.bpe_train import MAX_VOCAB_SIZE, save_bpe_files, train_bpe
from npdiffusion.models.clip.tokenizer import (
    CLIPTokenizer,
    byte_map,
    bytes_to_unicode,
    normalize_text,
    pre_tokenize,
    split_pattern,
)

HF = transformers.CLIPTokenizer
N_MERGES = 49152 - 256 - 2  # 48,894, CLIP's merge count


# ----------------------------------------------------------------------------------------- fixtures
def find_clip_bpe() -> str:
    """Path of open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the CLIP tokenizer tests need the real CLIP vocabulary from the open_clip_torch wheel; install "
                    "the test extra, or just that wheel without its dependencies: "
                    "pip install --no-deps open_clip_torch", pytrace=False)
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        pytest.fail(f"open_clip_torch is installed but {path} is missing; reinstall it: "
                    "pip install --no-deps --force-reinstall open_clip_torch", pytrace=False)
    return path


def reference_byte_symbols():
    """GPT-2/CLIP byte map written out independently of the module under test."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))], printable + rest


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """The real CLIP vocabulary as Hugging Face files (the recipe of parity-facts.md)."""
    lines = gzip.open(find_clip_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols, _ = reference_byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def hf(clip_dir):
    return HF.from_pretrained(str(clip_dir), model_max_length=77)


@pytest.fixture(scope="session")
def ours(clip_dir):
    return CLIPTokenizer(clip_dir / "vocab.json", clip_dir / "merges.txt")


SUBJECTS = ("a photo of an astronaut riding a horse on Mars", "portrait of a woman", "cyberpunk city at night",
            "a cat sitting on a windowsill", "steampunk airship", "bowl of ramen", "oil painting of a lighthouse",
            "close-up of a dragonfly", "Ancient Greek temple ruins", "a watercolor fox in the snow")
WORDS = ("masterpiece", "best quality", "highly detailed", "8k", "4K UHD", "trending on ArtStation", "by Greg Rutkowski",
         "octane render", "unreal engine 5", "bokeh", "f/1.8", "85mm", "golden hour", "HDR", "volumetric lighting",
         "(masterpiece:1.2)", "[[blurry]]", "{red|blue}", "photo-realistic", "ultra_wide", "#art", "@artist",
         "https://example.com/img_01.png?x=1&y=2", "$100", "50%", "3.14159", "1920x1080", "v2.1", "--ar 16:9",
         "it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "O'Neil", "rock'n'roll", "CAN'T", "Y'ALL",
         "''quoted''", "\"double\"", "“curly”", "‘single’", "—", "…", "...", "!!!", "?!", ";", ":)", "<3", "->",
         "café", "naïve", "Ångström", "Żółć", "ñandú", "straße", "ΣΟΦΙΑ", "ΟΔΟΣ", "İstanbul", "Дом и сад",
         "القاهرة", "עברית", "हिन्दी", "日本の桜", "中文提示词", "한국어", "ไทย", "🎉", "👩‍🚀", "🏳️‍🌈", "🇯🇵", "e\u0301",
         "ＡＢＣ１２３", "ﬁne", "①②", "½", "Ⅻ", "\u200b", "\ufeff", "\x00", "\x1c", "\x1f", "\x7f", "\u00ad",
         "<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>", "</w>", "<|", "|>", "Ǆ", "ﬀ", "ß", "ẞ", "K",
         "x²", "Ⅸ", "٣", "𝟘", "𝔸𝕓𝕔", "\U0002a6d6", "\U00010400")
SEPARATORS = (" ", " ", " ", " ", ", ", ",", "", "  ", "\t", "\n", "\r\n", " \n\t ", "\u00a0", "\u3000",
              "\x0b", "\x0c", "\u2028", "\x85", "\u2003", "\x1d")


def _case(rng, s):
    r = rng.random()
    if r < 0.15:
        return s.upper()
    if r < 0.3:
        return s.title()
    if r < 0.4:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in s)
    return s


def make_prompts(n=1200, seed=0):
    """Deterministic, varied prompts: SD-style, punctuation, digits, contractions, case, whitespace runs,
    non-ASCII, special-token lookalikes, and ~10% far longer than 77 tokens."""
    rng = random.Random(seed)
    fixed = ["", " ", "\t\n", "a", "A PHOTO OF A CAT", "hello, world!", "it's a dog's life", "3.14 is pi",
             "a  b\t\tc\n\nd", "<|startoftext|><|endoftext|>", "x<|endoftext|>!", "ΣΑΣ ΟΔΟΣ", "İİİ"]
    prompts = list(fixed)
    while len(prompts) < n:
        r = rng.random()
        if r < 0.1:
            k = rng.randint(60, 160)  # far beyond 77 tokens
        elif r < 0.2:
            k = rng.randint(0, 2)
        else:
            k = rng.randint(3, 25)
        parts = [rng.choice(SUBJECTS)] if rng.random() < 0.5 else []
        parts += [_case(rng, rng.choice(WORDS)) for _ in range(k)]
        if rng.random() < 0.2:
            parts.append(str(rng.randint(0, 10**9)))
        text = ""
        for p in parts:
            text += p + rng.choice(SEPARATORS)
        if rng.random() < 0.5:
            text = text.strip()
        prompts.append(text)
    return prompts


@pytest.fixture(scope="session")
def prompts():
    return make_prompts()


def _mismatches(pairs, limit=3):
    bad = [(p, a, b) for p, a, b in pairs if a != b]
    return f"{len(bad)} mismatches, first: {bad[:limit]}"


# ----------------------------------------------------------------------------------------- parity
def test_prompt_set_is_varied(prompts, hf):
    """The generated set has what the parity tests claim to cover."""
    assert len(prompts) >= 1000
    lengths = [len(hf(p).input_ids) for p in prompts]
    assert sum(n > 77 for n in lengths) >= 50
    assert "" in prompts
    for needle in ("'s", "\t", "\n", "  ", "日", "🎉", "é", "<|endoftext|>", "7"):
        assert sum(needle in p for p in prompts) >= 10, needle
    assert sum(p != p.lower() for p in prompts) >= 300


def test_encode_equals_transformers(ours, hf, prompts):
    pairs = [(p, ours.encode(p), hf(p).input_ids) for p in prompts]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)


@pytest.mark.parametrize("max_length,padding", [(77, "max_length"), (20, "max_length"), (77, "longest"),
                                                (5, "longest")])
def test_batch_equals_transformers(ours, hf, prompts, max_length, padding):
    got = ours(prompts, max_length=max_length, padding=padding, truncation=True)
    want = hf(prompts, max_length=max_length, padding=padding, truncation=True, return_tensors="np").input_ids
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if padding == "max_length":
        assert got.shape == (len(prompts), max_length)
        assert (got[:, 0] == 49406).all()


def test_call_defaults_and_single_prompt(ours, hf):
    got = ours("a photo of a cat")  # model_max_length = 77, padding to it, truncation on
    want = hf(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(got, want.input_ids)
    assert got.shape == (1, 77) and got[0, 6] == 49407 and (got[0, 7:] == 49407).all()
    long = ours(["word " * 200], max_length=77)
    assert long[0, -1] == 49407 and long[0, 0] == 49406  # truncation keeps the end token


def test_normalize_equals_reference_normalizer(hf, prompts):
    normalizer = hf.backend_tokenizer.normalizer
    pairs = [(p, normalize_text(p), normalizer.normalize_str(p)) for p in prompts]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)


def test_pre_tokenize_regex_and_re_agree_with_reference(hf, prompts):
    """Both pattern engines give the reference pre-tokenizer's pieces (after byte mapping)."""
    pytest.importorskip("regex", reason="the regex package is part of the test extra")
    pre = hf.backend_tokenizer.pre_tokenizer
    with_regex, with_re = split_pattern("regex"), split_pattern("re")
    assert isinstance(with_re, re.Pattern) and not isinstance(with_regex, re.Pattern)
    for p in prompts:
        text = normalize_text(p)
        want = [s for s, _ in pre.pre_tokenize_str(text)]
        a = [byte_map(x) for x in pre_tokenize(text, with_regex)]
        b = [byte_map(x) for x in pre_tokenize(text, with_re)]
        assert a == want and b == want, (p, a, b, want)


def test_re_engine_gives_transformers_ids(clip_dir, hf, prompts):
    tok = CLIPTokenizer(clip_dir / "vocab.json", clip_dir / "merges.txt")
    tok._split = split_pattern("re")
    pairs = [(p, tok.encode(p), hf(p).input_ids) for p in prompts[::3]]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)


def test_bytes_to_unicode_is_clips_layout(ours):
    symbols, byte_order = reference_byte_symbols()
    table = bytes_to_unicode()
    assert list(table) == byte_order and list(table.values()) == symbols
    assert [ours.encoder[s] for s in symbols] == list(range(256))
    assert [ours.encoder[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert ours.bos_token_id == 49406 and ours.eos_token_id == 49407 == ours.pad_token_id == ours.unk_token_id
    assert len(ours) == 49408 and len(ours.merges) == N_MERGES


# ----------------------------------------------------------------------------------------- decode
def test_decode_equals_transformers(ours, hf, prompts):
    for p in prompts[::2]:
        ids = hf(p).input_ids
        assert ours.decode(ids) == hf.decode(ids), p
        assert ours.decode(np.array(ids)) == hf.decode(ids), p
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), p


def test_decode_partial_utf8_equals_transformers(ours, hf):
    """Cutting a multi-byte character gives U+FFFD replacements exactly where the reference does."""
    for p in ("日本の桜 🎉 👩‍🚀 café", "中文提示词", "𝔸𝕓𝕔 🇯🇵"):
        ids = hf(p).input_ids
        for i in range(len(ids)):
            for j in range(i + 1, len(ids) + 1):
                assert ours.decode(ids[i:j]) == hf.decode(ids[i:j]), (p, i, j)


def test_decode_round_trip_ascii(ours, prompts):
    simple = ["a photo of a cat", "steampunk airship over a city at night", "bowl of ramen"]
    for p in simple:
        assert ours.decode(ours.encode(p), skip_special_tokens=True) == p
    # Printable ASCII plus tabs/newlines: decode's final strip() (Python's, as in transformers) would also eat
    # U+001C..U+001F, which the tokenizer itself keeps as punctuation.
    ascii_prompts = ["".join(c for c in p if " " <= c <= "~" or c in "\t\n").replace("<|", "< |") for p in prompts]
    assert len(ascii_prompts) >= 1000
    for p in ascii_prompts:
        ids = ours.encode(p)
        assert ours.encode(ours.decode(ids, skip_special_tokens=True)) == ids, p


# ----------------------------------------------------------------------------------------- files
def test_save_pretrained_loads_in_transformers(ours, prompts, tmp_path):
    folder = tmp_path / "tokenizer"
    ours.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                          "vocab.json"]  # no temporary files left behind
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and len(lines) == N_MERGES + 2 and lines[-1] == ""
    hf2 = HF.from_pretrained(str(folder))  # model_max_length comes from tokenizer_config.json
    assert hf2.model_max_length == 77
    again = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert again.encoder == ours.encoder and again.merges == ours.merges and again.model_max_length == 77
    sample = prompts[::4]
    pairs = [(p, ours.encode(p), hf2(p).input_ids) for p in sample]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)
    np.testing.assert_array_equal(again(sample), hf2(sample, padding="max_length", truncation=True,
                                                     return_tensors="np").input_ids)


def _token(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def _sd_folder(root, clip_dir, special_map, config_tokens):
    """A diffusers-style pipeline folder with a tokenizer/ subfolder (configs as SD 1.5 / 2 ship them)."""
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    shutil.copy(clip_dir / "vocab.json", folder)
    shutil.copy(clip_dir / "merges.txt", folder)
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "pad_token": "<|endoftext|>"}
    config.update({k: dict(v, __type="AddedToken") if isinstance(v, dict) else v for k, v in config_tokens.items()})
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return root


SPECIAL_PROMPTS = ["<|ENDOFTEXT|>", "a <|endoftext|> b", "hello! world!!", "x<|startoftext|>y", "<|StartOfText|>!",
                   "wow!!!<|endoftext|>!", "!", "<|endoftext|><|endoftext|>", "end<|ENDOFTEXT|>x!?"]
E, S = "<|endoftext|>", "<|startoftext|>"
SD_VARIANTS = {
    # Stable Diffusion 1.5: AddedToken dicts flagged normalized, pad a plain string.
    "sd15": ({"bos_token": _token(S, True), "eos_token": _token(E, True), "pad_token": E, "unk_token": _token(E, True)},
             {"bos_token": _token(S, True), "eos_token": _token(E, True), "unk_token": _token(E, True)}),
    # Stable Diffusion 2: pad token "!" (id 0), so "!" in a prompt is an added special token.
    "sd2": ({"bos_token": _token(S, True), "eos_token": _token(E, True), "pad_token": "!", "unk_token": _token(E, True)},
            {"bos_token": _token(S, True), "eos_token": _token(E, True), "unk_token": _token(E, True)}),
    # Conflicting flags for one content: transformers skips exact repeats, then the last flags win.
    "mixed": ({"bos_token": S, "eos_token": _token(E, True), "pad_token": _token(E, True), "unk_token": _token(E, False)},
              {"bos_token": _token(S, True)}),
}


@pytest.mark.parametrize("variant", sorted(SD_VARIANTS))
def test_pipeline_folder_configs_equal_transformers(clip_dir, prompts, tmp_path, variant):
    special_map, config_tokens = SD_VARIANTS[variant]
    root = _sd_folder(tmp_path / "pipe", clip_dir, special_map, config_tokens)
    want = HF.from_pretrained(str(root), subfolder="tokenizer")
    got = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    assert got.pad_token_id == want.pad_token_id and got.model_max_length == want.model_max_length == 77
    sample = SPECIAL_PROMPTS + prompts[::10]
    pairs = [(p, got.encode(p), want(p).input_ids) for p in sample]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)
    np.testing.assert_array_equal(got(sample, max_length=24), want(sample, padding="max_length", max_length=24,
                                                                   truncation=True, return_tensors="np").input_ids)
    for p in SPECIAL_PROMPTS:
        ids = want(p).input_ids
        assert got.decode(ids, skip_special_tokens=True) == want.decode(ids, skip_special_tokens=True)
    # Saving keeps the flags (through added_tokens_decoder): transformers reloads the same ids.
    got.save_pretrained(tmp_path / "saved")
    reloaded = HF.from_pretrained(str(tmp_path / "saved"))
    pairs = [(p, got.encode(p), reloaded(p).input_ids) for p in sample]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)
    assert reloaded.pad_token_id == got.pad_token_id


def test_merges_file_rules_match_transformers(clip_dir, tmp_path):
    """No silent slicing in transformers 5.x: a malformed or inconsistent merges.txt fails in both."""
    lines = (clip_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    cases = {"blank_line": lines[:10] + [""] + lines[10:], "too_many": lines[:-1] + ["ab cd", ""],
             "three_parts": lines[:5] + ["a b c"] + lines[5:]}
    for name, content in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(clip_dir / "vocab.json", folder)
        (folder / "merges.txt").write_text("\n".join(content), encoding="utf-8")
        with pytest.raises(ValueError, match="merge"):
            CLIPTokenizer.from_pretrained(folder)
        with pytest.raises(Exception):
            HF.from_pretrained(str(folder), model_max_length=77)


# ----------------------------------------------------------------------------------------- train_bpe
def make_captions(n, seed):
    rng = random.Random(seed)
    nouns = ("cat", "dog", "horse", "astronaut", "castle", "forest", "river", "mountain", "robot", "city", "flower",
             "ship", "dragon", "portrait", "street", "café", "garden", "tower", "bridge", "東京", "桜")
    adjs = ("red", "blue", "golden", "misty", "ancient", "futuristic", "tiny", "giant", "glowing", "snowy", "naïve")
    verbs = ("sitting", "running", "flying", "standing", "sleeping", "riding", "looking", "walking")
    out = []
    for _ in range(n):
        words = [rng.choice(("a", "the", "an", "two", "3")), rng.choice(adjs), rng.choice(nouns)]
        words += [rng.choice(verbs), rng.choice(("on", "in", "near", "under")), "the", rng.choice(adjs),
                  rng.choice(nouns)]
        if rng.random() < 0.3:
            words.append(rng.choice(("at sunset", "at night", "it's raining", "by an artist!", "8k, hdr", "🎉")))
        # made-up words keep the pair statistics rich
        words += ["".join(rng.choice("aeioustrnlkm") for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(0, 2))]
        out.append(_case(rng, " ".join(words)))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    corpus = make_captions(3000, seed=1)
    vocab, merges = train_bpe(corpus, vocab_size=1200)
    folder = tmp_path_factory.mktemp("trained")
    save_bpe_files(folder, vocab, merges)
    return corpus, vocab, merges, folder


def test_train_bpe_layout(trained):
    _, vocab, merges, _ = trained
    symbols, _ = reference_byte_symbols()
    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert len(vocab) == 1200 and len(merges) == 1200 - 514  # corpus rich enough; no reused spellings here
    assert tokens[:256] == symbols and tokens[256:512] == [s + "</w>" for s in symbols]
    assert tokens[512:-2] == [a + b for a, b in merges]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]


def test_train_bpe_files_load_in_transformers(trained, prompts):
    corpus, _, _, folder = trained
    want = HF.from_pretrained(str(folder))
    got = CLIPTokenizer.from_pretrained(folder)
    sample = corpus + make_captions(300, seed=99) + prompts[::2]  # the corpus, unseen captions, unseen text
    pairs = [(p, got.encode(p), want(p).input_ids) for p in sample]
    assert all(a == b for _, a, b in pairs), _mismatches(pairs)
    np.testing.assert_array_equal(got(sample), want(sample, padding="max_length", truncation=True,
                                                    return_tensors="np").input_ids)
    assert len(got.encode(corpus[0])) < len(corpus[0].encode("utf-8")) + 2  # merges compress the corpus


def naive_train(corpus, vocab_size, min_frequency):
    """Straightforward reference: recount every pair on every step."""
    symbols, _ = reference_byte_symbols()
    symbols = symbols + [s + "</w>" for s in symbols]
    ids = {s: i for i, s in enumerate(symbols)}
    words = {}
    pattern = split_pattern()
    for text in corpus:
        for piece in pre_tokenize(normalize_text(text), pattern):
            mapped = byte_map(piece)
            key = tuple(mapped[:-1]) + (mapped[-1] + "</w>",)
            words[key] = words.get(key, 0) + 1
    merges = []
    while len(symbols) < vocab_size - 2:
        counts = {}
        for word, f in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], ids[p[0]], ids[p[1]]))
        if counts[best] < min_frequency:
            break
        merged = best[0] + best[1]
        if merged not in ids:
            ids[merged] = len(symbols)
            symbols.append(merged)
        merges.append(best)
        new_words = {}
        for word, f in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + f
        words = new_words
    return merges


@pytest.mark.parametrize("vocab_size,min_frequency", [(514 + 150, 2), (514 + 400, 5), (514 + 80, 1)])
def test_train_bpe_equals_naive_recount(vocab_size, min_frequency):
    corpus = make_captions(150, seed=vocab_size) + ["aaaa aaa aa a", "abab ababab", "ǄǄ ǅ", "it's it's it's"]
    vocab, merges = train_bpe(corpus, vocab_size, min_frequency=min_frequency)
    assert merges == naive_train(corpus, vocab_size, min_frequency)
    assert len(vocab) == 514 + len({a + b for a, b in merges})


def test_train_bpe_is_deterministic_and_order_free():
    corpus = make_captions(400, seed=5)
    shuffled = list(corpus)
    random.Random(0).shuffle(shuffled)
    assert train_bpe(corpus, 700) == train_bpe(iter(shuffled), 700)


def test_train_bpe_stops_at_min_frequency():
    vocab, merges = train_bpe(["abc abc abd"] * 1, 600, min_frequency=3)
    assert merges == [("a", "b")]  # only "a b" occurs 3 times
    assert len(vocab) == 515 and vocab["ab"] == 512 and vocab["<|endoftext|>"] == 514


# ----------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors(ours, clip_dir):
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(123)
    with pytest.raises(ValueError, match="lone surrogate"):
        ours.encode("bad \ud800")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        ours(["ok", None])
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        ours("a", max_length=1)
    with pytest.raises(ValueError, match="padding must be"):
        ours("a", padding="do_not_pad")
    with pytest.raises(ValueError, match="more than max_length=8"):
        ours("one two three four five six seven", max_length=8, truncation=False)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 49408\)"):
        ours.decode([49406, 49408])
    with pytest.raises(TypeError, match="1-D sequence of ints"):
        ours.decode([[1, 2]])
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer(clip_dir / "vocab.json", clip_dir / "merges.txt", pad_token="<pad>")
    with pytest.raises(ValueError, match="needs 'zz'"):
        CLIPTokenizer({"z": 0, "z</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}, [("z", "z")])
    with pytest.raises(FileNotFoundError, match="vocab.json is missing"):
        CLIPTokenizer.from_pretrained(clip_dir.parent)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[514, 49408\]"):
        train_bpe(["a"], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a"], MAX_VOCAB_SIZE + 1)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe(["a"], 600, min_frequency=0)
    with pytest.raises(TypeError, match="single str"):
        train_bpe("a caption", 600)
    with pytest.raises(TypeError, match=r"corpus\[1\] must be a str"):
        train_bpe(["a", 2], 600)


def test_missing_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="pip install --no-deps open_clip_torch"):
        find_clip_bpe()
