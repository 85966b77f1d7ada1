"""The original inference config (v1-inference.yaml, v2-inference-v.yaml) <-> diffusers model configs.

Shapes: C0 = model_channels (the U-Net's first width), ch = the VAE's first width, mult the width
multipliers per level, D the text width; level i works at 1/2^i of the latent size ("resolution" 2^i
in attention_resolutions).

An original config is the nested dict of those YAML files (``model.params`` holds the diffusion
settings, ``unet_config.params`` the U-Net, ``first_stage_config.params.ddconfig`` the VAE).
Three functions turn one into diffusers configs, as diffusers' ``create_unet_diffusers_config_from_ldm``
/ ``create_vae_diffusers_config_from_ldm`` / ``_legacy_load_scheduler`` do, ``original_config_for``
writes one for npdiffusion's models, and ``infer_original_config`` reads one off the tensor shapes of
a checkpoint that comes without a YAML. Where we differ from diffusers, and why, is in
docs/checkpoints.md ("Configs").
"""
from __future__ import annotations

import logging
import re

from npdiffusion.pipelines.single_file_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, open_clip_layer_count

logger = logging.getLogger(__name__)

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPEN_CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
#: LDM's beta schedule names -> diffusers' (LDM's "linear" is linear in sqrt(beta): diffusers' scaled_linear)
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
#: what v1-inference.yaml / v2-inference*.yaml say (and what diffusers' single-file scheduler uses)
DEFAULTS = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215}
#: diffusers' SCHEDULER_DEFAULT_CONFIG (single_file_utils.py), the DDIM scheduler of a single file
SCHEDULER_DEFAULTS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                      "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False}
#: the global_step of SD 2.0-base's checkpoint: diffusers' one exception to "SD 2.x predicts v"
SD2_BASE_GLOBAL_STEP = 875000


def get_path(mapping, *path, default=None):
    for key in path:
        if not isinstance(mapping, dict) or key not in mapping:
            return default
        mapping = mapping[key]
    return mapping


def _require(original, *path):
    value = get_path(original, *path)
    if value is None:
        raise ValueError(f"original config: {'.'.join(path)} is missing (needed to build the model)")
    return value


# ------------------------------------------------------------------------------------------ original -> diffusers
def unet_config_from_original(original: dict) -> dict:
    """diffusers' UNet2DConditionModel config of an original config (create_unet_diffusers_config_from_ldm)."""
    p = _require(original, "model", "params", "unet_config", "params")
    c0, mult = _require(p, "model_channels"), list(_require(p, "channel_mult"))
    widths = [c0 * m for m in mult]
    attention = set(p.get("attention_resolutions") or [])
    has_attention = [2 ** i in attention for i in range(len(widths))]
    if p.get("num_heads", -1) not in (-1, None):
        heads = p["num_heads"]
    elif p.get("num_head_channels", -1) not in (-1, None):
        heads = [w // p["num_head_channels"] for w in widths]
    else:
        heads = 8                                                   # diffusers' default
    context = p.get("context_dim")
    image = get_path(original, "model", "params", "image_size")
    depth = p.get("transformer_depth", 1)
    config = {
        "sample_size": image if isinstance(image, int) else 64,
        "in_channels": _require(p, "in_channels"), "out_channels": _require(p, "out_channels"),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "block_out_channels": widths, "layers_per_block": _require(p, "num_res_blocks"),
        "cross_attention_dim": context[0] if isinstance(context, list) else context,
        "attention_head_dim": heads, "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
    }
    if "disable_self_attentions" in p:
        config["only_cross_attention"] = p["disable_self_attentions"]
    if p.get("norm_num_groups") is not None:          # npdiffusion's own key (LDM hard-codes 32 groups)
        config["norm_num_groups"] = p["norm_num_groups"]
    return config


def vae_config_from_original(original: dict, unet_sample_size: int) -> dict:
    """diffusers' AutoencoderKL config of an original config (create_vae_diffusers_config_from_ldm)."""
    dd = _require(original, "model", "params", "first_stage_config", "params", "ddconfig")
    ch, mult = _require(dd, "ch"), list(_require(dd, "ch_mult"))
    config = {
        "sample_size": unet_sample_size * 2 ** (len(mult) - 1),
        "in_channels": _require(dd, "in_channels"), "out_channels": _require(dd, "out_ch"),
        "down_block_types": ["DownEncoderBlock2D"] * len(mult), "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [ch * m for m in mult], "latent_channels": _require(dd, "z_channels"),
        "layers_per_block": _require(dd, "num_res_blocks"),
        "scaling_factor": get_path(original, "model", "params", "scale_factor", default=DEFAULTS["scale_factor"]),
    }
    if dd.get("attn_type") == "none":
        config["mid_block_add_attention"] = False
    if dd.get("norm_num_groups") is not None:
        config["norm_num_groups"] = dd["norm_num_groups"]
    return config


def scheduler_config_from_original(original: dict | None, version: int, prediction_type=None,
                                   global_step=None) -> dict:
    """The DDIM scheduler config of a single file (diffusers' ``_legacy_load_scheduler``).

    prediction_type: the argument if given; else the config's ``parameterization`` ("v" -> v_prediction,
    "x0" -> sample, "eps" -> epsilon) when a config is given; else diffusers' default: SD 2.x
    v_prediction (epsilon when ``global_step`` is 875000, SD 2.0-base), SD 1.x epsilon.
    """
    params = get_path(original, "model", "params", default={}) or {}
    config = dict(SCHEDULER_DEFAULTS)
    config["beta_start"] = params.get("linear_start", DEFAULTS["linear_start"])
    config["beta_end"] = params.get("linear_end", DEFAULTS["linear_end"])
    config["num_train_timesteps"] = params.get("timesteps", DEFAULTS["timesteps"])
    schedule = params.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"original config: beta_schedule {schedule!r} is not supported; npdiffusion reads "
                         f"{sorted(BETA_SCHEDULES)} (LDM's names)")
    config["beta_schedule"] = BETA_SCHEDULES[schedule]
    if prediction_type is None and original is not None:
        prediction_type = {"v": "v_prediction", "x0": "sample", "eps": "epsilon"}.get(
            params.get("parameterization", "eps"))
        if prediction_type is None:
            raise ValueError(f"original config: parameterization {params.get('parameterization')!r} is not one of "
                             "'eps', 'v', 'x0'")
    if prediction_type is None:
        prediction_type = "v_prediction" if version == 2 and global_step != SD2_BASE_GLOBAL_STEP else "epsilon"
    config["prediction_type"] = prediction_type
    return config


# ------------------------------------------------------------------------------------------ diffusers -> original
def _uniform(values, what: str):
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(set(values)) != 1:
        raise ValueError(f"the original layout needs one {what} for every level, got {values}")
    return values[0]


def original_config_for(unet: dict, vae: dict, text_kind: str, scheduler: dict) -> dict:
    """The original config (v1/v2-inference.yaml layout) of npdiffusion's models: U-Net and VAE configs,
    ``text_kind`` "clip" (SD 1.x) or "open_clip" (SD 2.x), and the scheduler's config. Settings the
    original code cannot express (it hard-codes 32 groups, for instance) are written as npdiffusion keys
    (``norm_num_groups``) and logged: other loaders then need the diffusers folder as config."""
    widths = list(unet["block_out_channels"])
    c0 = widths[0]
    if any(w % c0 for w in widths):
        raise ValueError(f"the original layout needs block_out_channels that are multiples of the first, got {widths}")
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    if [t.startswith("CrossAttn") for t in down] != [t.startswith("CrossAttn") for t in reversed(up)]:
        raise ValueError(f"the original layout puts attention in the same levels going down and up, got {down} / {up}")
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError("the original layout always has a middle block with attention, got mid_block_type="
                         f"{unet.get('mid_block_type')!r}")
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]
    params = {"image_size": 32, "in_channels": unet["in_channels"], "out_channels": unet["out_channels"],
              "model_channels": c0, "attention_resolutions": [2 ** i for i, t in enumerate(down) if t.startswith("CrossAttn")],
              "num_res_blocks": _uniform(unet["layers_per_block"], "layers_per_block"),
              "channel_mult": [w // c0 for w in widths]}
    if isinstance(heads, int) or len(set(heads)) == 1:
        params["num_heads"] = heads if isinstance(heads, int) else heads[0]
    else:
        params["num_head_channels"] = _uniform([w // h for w, h in zip(widths, heads)], "width per head")
    depth = unet.get("transformer_layers_per_block", 1)
    params.update({"use_spatial_transformer": True, "use_linear_in_transformer": bool(unet["use_linear_projection"]),
                   "transformer_depth": depth if isinstance(depth, int) else list(depth),
                   "context_dim": _uniform(unet["cross_attention_dim"], "cross_attention_dim"),
                   "use_checkpoint": True, "legacy": False})
    vae_widths = list(vae["block_out_channels"])
    dd = {"double_z": True, "z_channels": vae["latent_channels"], "resolution": vae["sample_size"]
          if isinstance(vae["sample_size"], int) else vae["sample_size"][0],
          "in_channels": vae["in_channels"], "out_ch": vae["out_channels"], "ch": vae_widths[0],
          "ch_mult": [w // vae_widths[0] for w in vae_widths], "num_res_blocks": vae["layers_per_block"],
          "attn_resolutions": [], "dropout": 0.0}
    if not vae.get("mid_block_add_attention", True):
        dd["attn_type"] = "none"
    unrepresented = []
    for name, cfg, target in (("U-Net", unet, params), ("VAE", vae, dd)):
        if cfg.get("norm_num_groups", 32) != 32:
            target["norm_num_groups"] = cfg["norm_num_groups"]
            unrepresented.append(f"{name} norm_num_groups={cfg['norm_num_groups']}")
    if unrepresented:
        logger.warning("the original Stable Diffusion code hard-codes 32 groups; this model has %s (written to the "
                       "YAML as npdiffusion keys): loaders that build the model from the YAML alone will run it "
                       "wrongly, give them the diffusers folder as config", ", ".join(unrepresented))
    schedule = {v: k for k, v in BETA_SCHEDULES.items()}.get(scheduler.get("beta_schedule", "scaled_linear"))
    if schedule is None or scheduler.get("trained_betas") is not None:
        raise ValueError(f"the original config holds scaled_linear or linear beta schedules, got "
                         f"{scheduler.get('beta_schedule')!r}{' with trained_betas' if scheduler.get('trained_betas') else ''}")
    model = {"linear_start": scheduler.get("beta_start", DEFAULTS["linear_start"]),
             "linear_end": scheduler.get("beta_end", DEFAULTS["linear_end"]),
             "num_timesteps_cond": 1, "log_every_t": 200,
             "timesteps": scheduler.get("num_train_timesteps", DEFAULTS["timesteps"]),
             "first_stage_key": "jpg", "cond_stage_key": "txt",
             "image_size": unet["sample_size"] if isinstance(unet["sample_size"], int) else unet["sample_size"][0],
             "channels": unet["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
             "monitor": "val/loss_simple_ema", "scale_factor": vae["scaling_factor"], "use_ema": False}
    if schedule != "linear":
        model["beta_schedule"] = schedule
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        model["parameterization"] = {"v_prediction": "v", "sample": "x0"}[prediction]
    model["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
    model["first_stage_config"] = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": vae["latent_channels"], "monitor": "val/rec_loss", "ddconfig": dd,
        "lossconfig": {"target": "torch.nn.Identity"}}}
    model["cond_stage_config"] = ({"target": CLIP_EMBEDDER} if text_kind == "clip" else
                                  {"target": OPEN_CLIP_EMBEDDER, "params": {"freeze": True, "layer": "penultimate"}})
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": model}}


# ------------------------------------------------------------------------------------------ shapes -> original
def _indices(tensors, pattern: str) -> list:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors for m in [regex.match(k)] if m})


def sd_version(tensors) -> int:
    """2 for an SD 2.x checkpoint (OpenCLIP text encoder, or 1024-wide cross-attention), else 1."""
    if any(k.startswith("cond_stage_model.model.") for k in tensors):
        return 2
    key = UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"   # diffusers' "v2" test
    return 2 if key in tensors and tensors[key].shape[-1] == 1024 else 1


def infer_original_config(tensors) -> dict:
    """An original config read off the shapes of a checkpoint's U-Net and VAE tensors (the YAML a file
    comes without). Heads are not in the weights: SD 2.x (linear projections or 1024-wide context) gets
    64 channels per head, SD 1.x 8 heads, as the two published configs say."""
    shape = {k: tuple(v.shape) for k, v in tensors.items()}
    version = sd_version(tensors)
    model = {"linear_start": DEFAULTS["linear_start"], "linear_end": DEFAULTS["linear_end"],
             "timesteps": DEFAULTS["timesteps"], "image_size": 96 if version == 2 else 64,
             "scale_factor": DEFAULTS["scale_factor"]}
    vae = next((p for p in (VAE, "vae.", "") if p + "encoder.conv_in.weight" in shape), None)
    if vae is not None:
        model["first_stage_config"] = {"params": {"ddconfig": infer_ddconfig(shape, vae)}}
    if UNET + "input_blocks.0.0.weight" in shape:
        model["unet_config"] = {"params": _infer_unet_params(shape, version)}
    return {"model": {"params": model}}


def _infer_unet_params(shape: dict, version: int) -> dict:
    first = UNET + "input_blocks.0.0.weight"
    c0 = shape[first][0]
    widths, attention, levels = [], [], [0]            # per level: width, has attention, resnet count
    for i in _indices(shape, re.escape(UNET) + r"input_blocks\.(\d+)\.")[1:]:
        if UNET + f"input_blocks.{i}.0.op.weight" in shape:
            levels.append(0)
            continue
        if levels[-1] == 0:
            widths.append(shape[UNET + f"input_blocks.{i}.0.out_layers.3.weight"][0])
            attention.append(UNET + f"input_blocks.{i}.1.proj_in.weight" in shape)
        levels[-1] += 1
    if len(set(levels)) != 1:
        raise ValueError(f"U-Net levels with different resnet counts {levels} are not Stable Diffusion")
    proj = next((k for k in shape if k.startswith(UNET) and k.endswith(".proj_in.weight")), None)
    to_k = next((k for k in shape if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise ValueError("the U-Net has no cross-attention (no *.proj_in.weight / *.attn2.to_k.weight): not Stable "
                         "Diffusion")
    depth = len(_indices(shape, re.escape(proj[: -len("proj_in.weight")]) + r"transformer_blocks\.(\d+)\."))
    linear = len(shape[proj]) == 2
    params = {"image_size": 32, "in_channels": shape[first][1], "out_channels": shape[UNET + "out.2.weight"][0],
              "model_channels": c0, "attention_resolutions": [2 ** i for i, a in enumerate(attention) if a],
              "num_res_blocks": levels[0], "channel_mult": [w // c0 for w in widths]}
    params.update({"num_head_channels": 64} if linear or version == 2 else {"num_heads": 8})
    params.update({"use_spatial_transformer": True, "use_linear_in_transformer": linear, "transformer_depth": depth,
                   "context_dim": shape[to_k][1], "legacy": False})
    return params


def infer_ddconfig(shape: dict, prefix: str) -> dict:
    """The VAE's ddconfig read off its tensor shapes (``prefix``: "first_stage_model.", "vae." or "")."""
    ch = shape[prefix + "encoder.conv_in.weight"][0]
    levels = _indices(shape, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mult = [shape[prefix + f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in levels]
    dd = {"double_z": True, "z_channels": shape[prefix + "decoder.conv_in.weight"][1], "resolution": 256,
          "in_channels": shape[prefix + "encoder.conv_in.weight"][1], "out_ch": shape[prefix + "decoder.conv_out.weight"][0],
          "ch": ch, "ch_mult": mult,
          "num_res_blocks": len(_indices(shape, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")),
          "attn_resolutions": [], "dropout": 0.0}
    if prefix + "encoder.mid.attn_1.q.weight" not in shape:
        dd["attn_type"] = "none"
    return dd


def text_config_from_tensors(tensors) -> dict:
    """The CLIPTextModel config read off a checkpoint's text-encoder shapes. SD 1.x (OpenAI CLIP ViT-L,
    ``cond_stage_model.transformer.*``): quick_gelu; SD 2.x (OpenCLIP ViT-H, ``cond_stage_model.model.*``):
    gelu and one layer fewer than the file's blocks (the penultimate layer's output is used). Heads are not
    in the weights: D / 64, as in both published encoders."""
    shape = {k: tuple(v.shape) for k, v in tensors.items()}
    if CLIP_PREFIX + "embeddings.token_embedding.weight" in shape:
        p = CLIP_PREFIX
        vocab, width = shape[p + "embeddings.token_embedding.weight"]
        config = {"hidden_act": "quick_gelu", "max_position_embeddings": shape[p + "embeddings.position_embedding.weight"][0],
                  "num_hidden_layers": len(_indices(shape, re.escape(p) + r"encoder\.layers\.(\d+)\.")),
                  "intermediate_size": shape[p + "encoder.layers.0.mlp.fc1.weight"][0], "projection_dim": width}
    elif OPEN_CLIP_PREFIX + "token_embedding.weight" in shape:
        p = OPEN_CLIP_PREFIX
        vocab, width = shape[p + "token_embedding.weight"]
        projection = shape.get(p + "text_projection", (width, width))
        config = {"hidden_act": "gelu", "max_position_embeddings": shape[p + "positional_embedding"][0],
                  "num_hidden_layers": open_clip_layer_count(tensors) - 1,
                  "intermediate_size": shape[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                  "projection_dim": projection[1]}
    else:
        raise ValueError("no text encoder in the checkpoint (cond_stage_model.transformer.* or cond_stage_model.model.*)")
    if width % 64:
        raise ValueError(f"the text encoder is {width} wide, not a multiple of 64: its number of heads is not in the "
                         "weights (CLIP ViT-L and OpenCLIP ViT-H have 64 channels per head); pass config=<a diffusers "
                         "folder> with its text_encoder/config.json")
    config.update({"vocab_size": vocab, "hidden_size": width, "num_attention_heads": width // 64,
                   "layer_norm_eps": 1e-5})
    return config
