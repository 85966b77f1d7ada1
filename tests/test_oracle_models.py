"""Acceptance of the oracle toolkit against independent implementations: diffusers' U-Net and VAE,
transformers' CLIP text encoder and CLIP model, diffusers/torch layers and diffusers' schedulers dump
their own activations and gradients under the golden names (tools/torch_golden_dump.py) and
``golden check`` passes them at the manifest's tolerances; one perturbed weight deep in the U-Net is
named as the first divergence, in forward and in backward."""
import json
import os
import sys

import pytest
import torch

from npdiffusion.cli import main
from npdiffusion.oracle import check_golden, export_golden

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from torch_golden_dump import dump_candidate, load_golden, load_weights  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEEP_ATTENTION = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"   # last cross-attention of the U-Net


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny models: two threads on a busy 2-core machine only spin
    yield
    torch.set_num_threads(previous)


def _config(golden_dir):
    with open(os.path.join(golden_dir, "config.json"), encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _twin(model, golden_dir):
    """(torch root module, forward(root, inputs) -> named outputs) of the model in the golden folder."""
    cfg = _config(golden_dir)
    if model == "unet":
        from diffusers import UNet2DConditionModel
        root = UNet2DConditionModel.from_config(cfg)
        return root, lambda m, x: {"sample": m(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample}
    if model == "vae":
        from diffusers import AutoencoderKL
        return AutoencoderKL.from_config(cfg), lambda m, x: {"sample": m(x["sample"]).sample}
    if model == "text-encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        def forward(m, x):
            out = m(input_ids=x["input_ids"])
            return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        return CLIPTextModel(CLIPTextConfig(**cfg)), forward
    from transformers import CLIPConfig, CLIPModel

    def forward(m, x):
        out = m(input_ids=x["input_ids"], pixel_values=x["pixel_values"], return_loss=True)
        return {"loss": out.loss, "logits_per_text": out.logits_per_text, "text_embeds": out.text_embeds,
                "image_embeds": out.image_embeds}
    return CLIPModel(CLIPConfig(**cfg)), forward


def _dump(model, golden_dir, out, dtype="float32", teacher_forcing=False, params=True, edit=None):
    root, forward = _twin(model, golden_dir)
    root = root.to(DTYPES[dtype])
    load_weights(root, load_golden(golden_dir)[1])
    if edit is not None:
        edit(root)
    dump_candidate(root, golden_dir, out, forward, dtype=DTYPES[dtype], teacher_forcing=teacher_forcing,
                   params=params)
    return str(out)


@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    base = tmp_path_factory.mktemp("goldens")
    out = {}
    for model in ("unet", "vae", "text-encoder", "clip"):
        out[model] = str(base / model)
        export_golden(model, out[model], seed=0)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", ["unet", "vae", "text-encoder", "clip"])
def test_torch_twin_passes_golden_check(goldens, tmp_path, capsys, model, dtype):
    path = _dump(model, goldens[model], tmp_path / "cand.safetensors", dtype)
    report = check_golden(goldens[model], path)
    assert report.passed, report.table(only_failures=True) + "\n" + report.summary()
    # every required key was there and compared; most optional ones too
    assert not report.missing_required
    required = [r for r in report.results if r.required]
    assert all(r.rel is not None for r in required) and len(required) > 80
    assert len(report.compared) > 0.9 * len(report.results)
    assert main(["golden", "check", goldens[model], path, "--only-failures"]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out


def _perturb(name, index=(1, 2), delta=0.5):
    def edit(root):
        with torch.no_grad():
            root.get_submodule(name).weight[index] += delta
    return edit


def test_perturbed_deep_attention_weight_is_the_first_divergence_forward_and_backward(goldens, tmp_path, capsys):
    g = goldens["unet"]
    path = _dump("unet", g, tmp_path / "forced.safetensors", teacher_forcing=True, edit=_perturb(DEEP_ATTENTION))
    report = check_golden(g, path)
    assert not report.passed and report.teacher_forced
    assert report.first_forward_divergence.layer == DEEP_ATTENTION
    assert report.first_forward_divergence.key == f"act/{DEEP_ATTENTION}/output"
    assert report.first_backward_divergence.layer == DEEP_ATTENTION
    assert report.first_backward_divergence.key == f"grad/{DEEP_ATTENTION}/input.0"
    # teacher forcing keeps the error where it is made: the weight itself, y = x W'^T and dx = g W'
    # diverge; dW = g^T x (golden g and x) and everything else match
    assert {r.key for r in report.results if r.diverged} == {
        f"param/{DEEP_ATTENTION}.weight", f"act/{DEEP_ATTENTION}/output", f"grad/{DEEP_ATTENTION}/input.0"}
    assert report.first_divergence.layer == DEEP_ATTENTION and not report.missing_required
    assert main(["golden", "check", g, path, "--only-failures"]) == 1
    out = capsys.readouterr().out
    assert f"first forward divergence: layer '{DEEP_ATTENTION}'" in out
    assert f"first backward divergence: layer '{DEEP_ATTENTION}'" in out


def test_perturbed_weight_without_teacher_forcing(goldens, tmp_path):
    """A plain dump: the forward names the layer; everything after it diverges too, and the report
    says that backward divergences may be consequences."""
    g = goldens["unet"]
    report = check_golden(g, _dump("unet", g, tmp_path / "plain.safetensors", params=False,
                                   edit=_perturb(DEEP_ATTENTION)))
    assert report.first_forward_divergence.layer == DEEP_ATTENTION
    assert "can be its consequence" in report.summary()


class _WrongBackwardLinear(torch.autograd.Function):
    """x W^T + b with a backward that uses 1.01 W for the input gradient: a backward-only bug."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + (0 if b is None else b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return g @ (1.01 * w), gw, None


def test_backward_only_bug_is_the_first_backward_divergence(goldens, tmp_path):
    g = goldens["unet"]

    def edit(root):
        lin = root.get_submodule(DEEP_ATTENTION)
        lin.forward = lambda x: _WrongBackwardLinear.apply(x, lin.weight, lin.bias)

    report = check_golden(g, _dump("unet", g, tmp_path / "bwd.safetensors", params=False, edit=edit))
    assert report.first_forward_divergence is None
    assert report.first_backward_divergence.layer == DEEP_ATTENTION
    assert report.first_backward_divergence.key == f"grad/{DEEP_ATTENTION}/input.0"


def _op_twins():
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    def pos(m, x):
        return {"output": m(*x.values())}

    def cross(m, x):
        return {"output": m(x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"])}
    return {
        "linear": (lambda: torch.nn.Linear(4, 3), pos),
        "conv2d": (lambda: torch.nn.Conv2d(2, 3, 3, padding=1), pos),
        "group_norm": (lambda: torch.nn.GroupNorm(2, 4, eps=1e-5), pos),
        "layer_norm": (lambda: torch.nn.LayerNorm(5), pos),
        "attention": (lambda: Attention(8, heads=2, dim_head=4), pos),
        "cross_attention": (lambda: Attention(8, cross_attention_dim=6, heads=2, dim_head=4), cross),
        "geglu": (lambda: GEGLU(6, 5), pos),
        "feedforward": (lambda: FeedForward(6, mult=2), pos),
        "resnet_block": (lambda: ResnetBlock2D(in_channels=4, out_channels=6, temb_channels=5, groups=2), pos),
        "transformer_block": (lambda: BasicTransformerBlock(8, 2, 4, cross_attention_dim=6), cross),
        "transformer_2d": (lambda: Transformer2DModel(2, 4, in_channels=8, norm_num_groups=2, cross_attention_dim=6),
                           lambda m, x: {"output": m(x["hidden_states"], return_dict=False,
                                                     encoder_hidden_states=x["encoder_hidden_states"])[0]}),
    }


@pytest.mark.parametrize("name", ["linear", "conv2d", "group_norm", "layer_norm", "attention", "cross_attention",
                                  "geglu", "feedforward", "resnet_block", "transformer_block", "transformer_2d"])
def test_layers_against_their_torch_twins(tmp_path, name):
    g = str(tmp_path / "g")
    export_golden(f"op:{name}", g, seed=4)
    make, forward = _op_twins()[name]
    root = make().to(torch.float32)
    load_weights(root, load_golden(g)[1])
    path = str(tmp_path / "cand.safetensors")
    dump_candidate(root, g, path, forward)
    report = check_golden(g, path)
    assert report.passed and not report.missing_required, report.table(only_failures=True) + report.summary()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                      ("dpm_multistep", "DPMSolverMultistepScheduler")])
def test_schedulers_against_diffusers(tmp_path, name, cls):
    import diffusers

    g = str(tmp_path / "g")
    m = export_golden(f"scheduler:{name}", g, seed=2)
    _, golden = load_golden(g)
    sched = getattr(diffusers, cls).from_config(m["config"]["scheduler"])
    sched.set_timesteps(m["config"]["num_inference_steps"])
    x = torch.from_numpy(golden["input/sample"]).float() * sched.init_noise_sigma
    dump = {"act/schedule/timesteps": sched.timesteps.numpy()}
    for k, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        eps = inp * (float(t) / (float(t) + 1.0))
        x = sched.step(eps, t, x).prev_sample
        dump[f"act/step.{k}/model_input"] = inp.numpy()
        dump[f"act/step.{k}/model_output"] = eps.numpy()
        dump[f"act/step.{k}/prev_sample"] = x.numpy()
    dump["output/sample"] = x.numpy()
    report = check_golden(g, dump)
    assert report.passed and not report.missing_required, report.table(only_failures=True) + report.summary()
