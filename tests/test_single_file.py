"""Original single-file Stable Diffusion checkpoints (issue 22): our files load in diffusers' from_single_file
with the same images, diffusers' own conversion of them loads here with identical weights, folder -> file ->
folder is bitwise, the OpenCLIP layout runs in a torch OpenCLIP text tower, configs are inferred from shapes
as the published YAMLs say, and non-SD files, pickles and SDXL are refused on one line.

Fixtures: the tiny SD 1.x pipeline of pipeline_dummy.py, and a tiny SD 2.x-shaped one built here in diffusers
(linear transformer projections, per-block heads, a GELU text encoder saved in OpenCLIP's layout,
v-prediction, 32 norm groups so that the original YAML describes it fully). Everything is local.
"""
import os
import tracemalloc

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline as DiffusersPipeline

from npdiffusion.cli import main
from npdiffusion.io.lazy_tensors import file_tensors
from npdiffusion.io.safetensors import load_file, save_file
from npdiffusion.models.clip.pretrained import strip_prefix
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
from npdiffusion.pipelines import StableDiffusionPipeline
from npdiffusion.pipelines.original_config import infer_original_config, unet_config_from_original
from npdiffusion.pipelines.single_file_keys import unet_to_original
from npdiffusion.pipelines.small_yaml import dump_yaml, parse_yaml
from parity import torch_threads
from pipeline_dummy import PROMPTS, build_tokenizer_files, dummy_folder, our_pipeline, quiet_diffusers

KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    """A tiny SD 2.x-shaped diffusers pipeline folder (see the module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers import UNet2DConditionModel as DUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    quiet_diffusers()
    root = tmp_path_factory.mktemp("sd2")
    build_tokenizer_files(str(root / "bpe"))
    torch.manual_seed(1)
    unet = DUNet(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                 attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=64,
                                        intermediate_size=128, num_attention_heads=1, num_hidden_layers=2,
                                        hidden_act="gelu", vocab_size=1000, projection_dim=64))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                              timestep_spacing="leading")
    pipe = DiffusersPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(
        str(root / "bpe")), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                             requires_safety_checker=False)
    pipe.save_pretrained(str(root / "sd2"))
    return str(root / "sd2")


def _ours(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs_images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(5), **KW, **kw).images


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), f"{name}.{k}"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_our_file_gives_diffusers_our_images_and_its_conversion_our_weights(kind, sd2_folder, tmp_path):
    folder = dummy_folder() if kind == "sd1" else sd2_folder
    ours = _ours(folder)
    path = ours.save_single_file(tmp_path / "model.safetensors")
    quiet_diffusers()
    options = {"original_config": str(tmp_path / "model.yaml")} if kind == "sd2" else {}   # SD 1.x: 2 groups
    theirs = DiffusersPipeline.from_single_file(path, config=folder, local_files_only=True, **options)
    size = dict(height=16, width=16)
    a = ours(PROMPTS, seed=5, noise="torch", **KW, **size).images
    b = _theirs_images(theirs, **size)
    assert np.abs(a - b).max() <= 1e-4
    # diffusers' conversion of our file, saved as a folder, loads here with the weights we started from
    theirs.save_pretrained(tmp_path / "theirs")
    _assert_same_weights(ours, StableDiffusionPipeline.from_pretrained(tmp_path / "theirs"))
    # and our own loader reads the file back to the same weights
    _assert_same_weights(ours, StableDiffusionPipeline.from_single_file(path, config=folder))


def test_sd2_file_alone_with_its_yaml_loads_as_v_prediction_ddim(sd2_folder, tmp_path):
    ours = _ours(sd2_folder)
    path = ours.save_single_file(tmp_path / "sd2.safetensors")
    original = yaml.safe_load(open(tmp_path / "sd2.yaml", encoding="utf-8"))
    params = original["model"]["params"]
    assert params["parameterization"] == "v" and params["unet_config"]["params"]["use_linear_in_transformer"]
    assert params["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
    alone = StableDiffusionPipeline.from_single_file(path, tokenizer=os.path.join(sd2_folder, "tokenizer"))
    alone.set_progress_bar_config(disable=True)
    assert type(alone.scheduler).__name__ == "DDIMScheduler"
    assert alone.scheduler.config["prediction_type"] == "v_prediction"
    _assert_same_weights(ours, alone)
    a = ours(PROMPTS, seed=5, noise="torch", **KW).images
    assert np.array_equal(alone(PROMPTS, seed=5, noise="torch", **KW).images, a)
    assert alone.scheduler.config["steps_offset"] == 1 and alone.scheduler.config["timestep_spacing"] == "leading"


def _open_clip_text_tower(tensors, layers, heads):
    """OpenCLIP's TextTransformer in torch (ResidualAttentionBlock with nn.MultiheadAttention: fused in_proj),
    running all blocks but the last, then ln_final: SD 2.x's FrozenOpenCLIPEmbedder(layer="penultimate")."""
    width = tensors["token_embedding.weight"].shape[1]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
            self.attn = torch.nn.MultiheadAttention(width, heads)
            self.mlp = torch.nn.Sequential()
            self.mlp.add_module("c_fc", torch.nn.Linear(width, 4 * width // 2))
            self.mlp.add_module("gelu", torch.nn.GELU())
            self.mlp.add_module("c_proj", torch.nn.Linear(4 * width // 2, width))

        def forward(self, x, mask):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            return x + self.mlp(self.ln_2(x))

    tower = torch.nn.Module()
    tower.token_embedding = torch.nn.Embedding(*tensors["token_embedding.weight"].shape)
    tower.positional_embedding = torch.nn.Parameter(torch.zeros(tensors["positional_embedding"].shape))
    tower.transformer = torch.nn.Module()
    tower.transformer.resblocks = torch.nn.ModuleList([Block() for _ in range(layers + 1)])
    tower.ln_final = torch.nn.LayerNorm(width)
    tower.text_projection = torch.nn.Parameter(torch.zeros(tensors["text_projection"].shape))
    tower.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)

    def encode(ids):
        n = ids.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = (tower.token_embedding(ids) + tower.positional_embedding[:n]).permute(1, 0, 2)
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, mask)
        return tower.ln_final(x.permute(1, 0, 2))
    return encode


def test_open_clip_layout_runs_in_a_torch_open_clip_tower(sd2_folder, tmp_path):
    ours = _ours(sd2_folder)
    path = ours.save_single_file(tmp_path / "sd2.safetensors")
    prefix = "cond_stage_model.model."
    tensors = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    last = [k for k in tensors if k.startswith("transformer.resblocks.2.")]
    assert last and all(not tensors[k].any() for k in last)          # the unused block: zeros, an identity
    encode = _open_clip_text_tower(tensors, layers=2, heads=1)
    ids = np.array([[0, 5, 17, 99, 2, 1, 1, 1], [0, 44, 2, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = encode(torch.from_numpy(ids)).numpy()
    got = np.asarray(ours.text_encoder(ids)[0])
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_convert_both_ways_round_trips_bitwise(sd2_folder, tmp_path, capsys):
    for name, folder in (("sd1", dummy_folder()), ("sd2", sd2_folder)):
        single = tmp_path / f"{name}.safetensors"
        assert main(["convert", folder, str(single)]) == 0
        assert main(["convert", str(single), str(tmp_path / name), "--config", folder]) == 0
        for sub, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                             ("text_encoder", "model")):
            a = strip_prefix(load_file(os.path.join(folder, sub, weights + ".safetensors")), "text_model.")
            b = strip_prefix(load_file(tmp_path / name / sub / (weights + ".safetensors")), "text_model.")
            assert a.keys() == b.keys(), (name, sub)
            assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), (name, sub)
        # a second trip writes the same single file, byte for byte
        assert main(["convert", str(tmp_path / name), str(tmp_path / f"{name}-again.safetensors")]) == 0
        assert single.read_bytes() == (tmp_path / f"{name}-again.safetensors").read_bytes()
    capsys.readouterr()


def test_ema_weights_are_written_as_model_ema_and_read_like_diffusers(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    pipe = our_pipeline()
    ema = {k: v * 0.5 for k, v in pipe.unet.state_dict().items()}
    path = pipe.save_single_file(tmp_path / "ema.safetensors", ema_unet=ema)
    tensors = load_file(path)
    flat = "model_ema.diffusion_modelinput_blocks00weight"
    assert np.array_equal(tensors[flat], ema["conv_in.weight"])
    assert sum(k.startswith("model_ema.") for k in tensors) == len(ema)
    theirs = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in tensors.items()}, pipe.unet.config,
                                         extract_ema=True)
    assert theirs.keys() == ema.keys() and all(np.array_equal(theirs[k].numpy(), ema[k]) for k in ema)
    loaded = UNet2DConditionModel.from_single_file(path, config=dummy_folder(), extract_ema=True).state_dict()
    assert all(np.array_equal(loaded[k], ema[k]) for k in ema)
    plain = UNet2DConditionModel.from_single_file(path, config=dummy_folder()).state_dict()
    assert all(np.array_equal(plain[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("version", [1, 2])
def test_configs_inferred_from_full_size_shapes_match_the_published_yaml(version):
    """SD 1.5 and SD 2.1 U-Net shapes (torch's meta device: no memory), named by our table: the config read off
    the shapes equals the one diffusers builds from v1-inference.yaml / v2-inference-v.yaml."""
    from diffusers import UNet2DConditionModel as DUNet
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    unet = {"model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "transformer_depth": 1, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "image_size": 32}
    unet.update({"num_heads": 8, "context_dim": 768} if version == 1 else
                {"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024})
    original = {"model": {"params": {"unet_config": {"params": unet}, "first_stage_config": {"params": {"ddconfig": {
        "ch_mult": [1, 2, 4, 4]}}}}}}
    with torch.device("meta"):
        reference = create_unet_diffusers_config_from_ldm(original, {})
        model = DUNet(**reference)
    shapes = {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), tuple(v.shape), [0] * v.ndim)
              for k, v in model.state_dict().items()}
    tensors = unet_to_original(shapes, model.config)
    if version == 2:                                        # an OpenCLIP text encoder marks SD 2.x
        tensors["cond_stage_model.model.token_embedding.weight"] = np.zeros((1, 1024), np.float32)
    inferred = unet_config_from_original(infer_original_config(tensors))
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                "transformer_layers_per_block"):
        assert inferred[key] == reference[key], key


V2_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def test_small_yaml_reads_what_pyyaml_reads_and_writes_what_it_reads():
    assert parse_yaml(V2_YAML) == yaml.safe_load(V2_YAML)
    odd = {"a": {"f": [1e16, 1e-5, 0.5, -2.5e-300], "s": ["yes", "1e-6", "x y", "-a", "", None, True, "a: b"],
                 "e": {}, "n": None, "t": "0x1F", "i": -7}}
    text = dump_yaml(odd)
    assert yaml.safe_load(text) == odd and parse_yaml(text) == odd
    for scalar in ("1e-6", "1.e-6", "1.0e+4", "1.0e4", "yes", "Off", "~", "010", "0x1F", "-.inf", "'quoted'", "12_3"):
        assert parse_yaml(f"k: {scalar}") == yaml.safe_load(f"k: {scalar}"), scalar
    for bad in ("a: &x 1", "a: !!str 1", "a: |\n  text", "a: [1, [2]]", "a:\n  - b: 1", "a: {b: 1}"):
        with pytest.raises(ValueError, match="line"):
            parse_yaml(bad)


def test_non_sd_files_pickles_and_sdxl_are_refused_on_one_line(tmp_path, capsys):
    z = np.zeros((2, 2), np.float32)
    cases = {
        "model.ckpt": (b"PK\x03\x04 pickle", "pickle.*torch.load"),
        "renamed.safetensors": (b"\x80\x04\x95 pickle bytes", "pickle"),
        "sdxl.safetensors": ({"conditioner.embedders.0.transformer.x": z, "model.diffusion_model.y": z}, "SDXL"),
        "lora.safetensors": ({"lora_unet_down.alpha": z}, "lacks the U-Net.*LoRA"),
        "diffusers.safetensors": ({"down_blocks.0.resnets.0.conv1.weight": z}, "diffusers names"),
        "other.safetensors": ({"linear.weight": z, "linear.bias": z}, r"2 tensors \(2 under linear"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            save_file(content, path)
        with pytest.raises(ValueError, match=message):
            StableDiffusionPipeline.from_single_file(path, config=dummy_folder())
        assert main(["convert", str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "npdiffusion convert: error:" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", dummy_folder(), str(tmp_path / "x.ckpt")]) == 2
    assert "npdiffusion writes no pickles" in capsys.readouterr().err


def test_loading_reads_one_tensor_at_a_time(tmp_path):
    """Filling a built model from a file allocates at most about its largest tensor, not the file."""
    pipe = our_pipeline()
    path = pipe.save_single_file(tmp_path / "m.safetensors")
    tensors = file_tensors(path)
    from npdiffusion.pipelines.single_file_keys import unet_from_original
    state = unet_from_original(tensors, pipe.unet.config)
    largest = max(np.dtype(v.dtype).itemsize * int(np.prod(v.shape)) for v in state.values())
    total = sum(np.dtype(v.dtype).itemsize * int(np.prod(v.shape)) for v in state.values())
    assert total > 8 * largest
    tracemalloc.start()
    pipe.unet.load_state_dict(state)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 2 * largest + 64 * 1024


def test_models_alone_from_single_files_read_off_their_shapes(sd2_folder, tmp_path):
    """A VAE file of its own (no prefix, as vae-ft-mse-840000-ema-pruned) and the OpenCLIP text encoder load
    without any config: their configs read off the shapes equal the folder's."""
    from npdiffusion.models.clip.text_model import CLIPTextModel
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL

    ours = _ours(sd2_folder)
    path = ours.save_single_file(tmp_path / "sd2.safetensors")
    os.remove(tmp_path / "sd2.yaml")
    vae_only = {k[len("first_stage_model."):]: v for k, v in load_file(path).items()
                if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae.safetensors")
    for model, loaded in ((ours.vae, AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")),
                          (ours.text_encoder, CLIPTextModel.from_single_file(path))):
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "mid_block_add_attention"):
        assert AutoencoderKL.from_single_file(tmp_path / "vae.safetensors").config[key] == ours.vae.config[key]
    text = CLIPTextModel.from_single_file(path).config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
        assert getattr(text, key) == getattr(ours.text_encoder.config, key), key
    with pytest.raises(ValueError, match="holds no tokenizer"):
        StableDiffusionPipeline.from_single_file(path)
