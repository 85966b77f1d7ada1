"""CLIP: the byte-level BPE tokenizer, its trainer, and the text (and image) encoders."""
