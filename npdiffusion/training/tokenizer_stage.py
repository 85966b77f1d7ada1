"""``npdiffusion train tokenizer``: learn a CLIP byte-level BPE tokenizer from the dataset's captions.

No gradients here: ``train_bpe`` (npdiffusion/models/clip/bpe_train.py) counts the words of every
caption and merges the most frequent adjacent symbol pair until the vocabulary reaches
``vocab_size`` or no pair occurs ``min_frequency`` times. The result is written as a Hugging Face
``tokenizer/`` folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) in
``output_dir``, each file atomically; it loads in ``CLIPTokenizer.from_pretrained`` here and in
transformers with the same ids. The run is deterministic (it depends only on the multiset of
captions), so ``--resume`` has nothing to resume and simply trains again. Under ``mpiexec -n N``
rank 0 does the whole job and the other ranks return at once (it is one process's work).

Config (TOML)::

    output_dir = "runs/tokenizer"
    [data]        dataset, path, num_images, resolution, seed, caption_column (see DataConfig)
    [tokenizer]   vocab_size, min_frequency, model_max_length

Docs: docs/training.md ("The tokenizer stage").
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from npdiffusion.training.config import DataConfig, option, section

NAME = "tokenizer"


@dataclass
class TokenizerOptions:
    """``[tokenizer]``: the BPE vocabulary."""

    vocab_size: int = option(1000, "the largest vocabulary: 512 byte symbols + merges + 2 special tokens "
                             "(fewer when the captions run out of pairs)", min=514)
    min_frequency: int = option(2, "merge a pair only if it occurs at least this often", min=1)
    model_max_length: int = option(77, "tokens per prompt after padding/truncation (CLIP's 77)", min=2)


@dataclass
class TokenizerStageConfig:
    """The config file of ``npdiffusion train tokenizer``."""

    output_dir: str = option("runs/tokenizer", "folder that receives tokenizer/ (created if missing)")
    data: DataConfig = section(DataConfig, "the captions to learn from")
    tokenizer: TokenizerOptions = section(TokenizerOptions, "the BPE vocabulary")


CONFIG = TokenizerStageConfig


def train(config: TokenizerStageConfig, resume: bool = False, progress=None, log=print) -> str:
    """Learn the tokenizer and write ``output_dir/tokenizer``; returns a one-line summary."""
    from npdiffusion.models.clip.bpe_train import save_bpe_files, train_bpe  # noqa: PLC0415
    from npdiffusion.models.clip.tokenizer import CLIPTokenizer, normalize_text, pre_tokenize  # noqa: PLC0415
    from npdiffusion.training.checkpoint import prepare_output_dir  # noqa: PLC0415
    from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415

    comm = get_communicator()
    if not comm.is_root:     # mpiexec -n N: rank 0 learns and writes the tokenizer, exactly as one process
        return f"{NAME}: learned by rank 0 of {comm.size}"
    out = prepare_output_dir(config.output_dir)           # fail before any work
    dataset = dataset_from_config(config.data)
    captions = list(dataset.captions)
    start = time.perf_counter()
    opts = config.tokenizer
    vocab, merges = train_bpe(captions, opts.vocab_size, opts.min_frequency)
    folder = os.path.join(out, "tokenizer")
    save_bpe_files(folder, vocab, merges, model_max_length=opts.model_max_length)
    seconds = time.perf_counter() - start

    tok = CLIPTokenizer.from_pretrained(folder)
    distinct = sorted(set(captions))
    lengths = [len(tok.tokenize_ids(c)) for c in distinct]
    words = sorted({w for c in distinct for w in pre_tokenize(normalize_text(c))})
    whole = sum(len(tok.tokenize_ids(w)) == 1 for w in words)
    longest = max(lengths) + 2                              # + start and end tokens
    note = ""
    if longest > opts.model_max_length:
        note = f"; WARNING: the longest caption needs {longest} tokens, over model_max_length {opts.model_max_length}"
    return (f"{NAME}: {len(merges)} merges, vocabulary {len(vocab)}, from {len(captions)} captions "
            f"({len(distinct)} distinct) in {seconds:.1f} s; {whole} of {len(words)} distinct words (pieces) are one token; "
            f"captions take {min(lengths)}-{max(lengths)} tokens (+2 special){note}; wrote {folder}")
