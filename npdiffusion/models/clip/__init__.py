"""CLIP: the byte-level BPE tokenizer, its trainer, and the text and image encoders with the
contrastive model that trains them together (docs/clip.md).

    tokenizer.py     CLIPTokenizer (transformers' ids), bpe_train.py: train_bpe
    config.py        CLIPTextConfig, CLIPVisionConfig, CLIPConfig (transformers' keys and defaults)
    attention.py     CLIPAttention (causal / additive masks)
    encoder.py       CLIPMLP, CLIPEncoderLayer, CLIPEncoder (all hidden states, for clip skip)
    text_model.py    CLIPTextModel (Stable Diffusion's text encoder)
    vision_model.py  CLIPVisionModel (ViT)
    clip_model.py    CLIPModel: projections, logit_scale, the contrastive loss
    contrastive.py   the InfoNCE loss and its gradient as op pairs
"""
from npdiffusion.models.clip.clip_model import CLIPModel, CLIPOutput
from npdiffusion.models.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.clip.tokenizer import CLIPTokenizer
from npdiffusion.models.clip.vision_model import CLIPVisionModel

__all__ = ["CLIPTokenizer", "CLIPTextConfig", "CLIPVisionConfig", "CLIPConfig", "CLIPTextModel",
           "CLIPVisionModel", "CLIPModel", "CLIPOutput"]
