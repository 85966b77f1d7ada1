"""LoraLayer and add_lora: float64 gradient checks of every LoRA layer (Linear, 1x1 and 3x3 Conv2d, with
dropout), frozen-base backward (no dW), PEFT init, fuse/unfuse against PEFT's merge, parity with diffusers'
UNet2DConditionModel + peft's LoraConfig and with transformers' CLIPTextModel + peft (forward, input
gradients and every adapter gradient in float64), target matching and its errors."""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from peft import LoraConfig
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.lora import add_lora, matching_modules, remove_lora
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.unet import UNet2DConditionModel
from npdiffusion.nn import Conv2d, Linear
from npdiffusion.nn.lora import LoraLayer
from npdiffusion.nn.module import Module
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import randomize_, torch_state_to_numpy, torch_threads

RTOL = 1e-10    # float64 parity, as every model parity test (tests/parity.py)

LAYERS = {
    "linear": (lambda: Linear(5, 6), (2, 3, 5)),
    "conv1x1": (lambda: Conv2d(4, 5, 1), (2, 4, 5, 6)),
    "conv3x3": (lambda: Conv2d(3, 4, 3, padding=1), (2, 3, 6, 5)),
    "conv3x3-stride2": (lambda: Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6)),
}


def _lora(kind, rank=2, alpha=3.0, dropout=0.0, seed=0):
    build, shape = LAYERS[kind]
    layer = LoraLayer(build(), rank, alpha, dropout).to("float64")
    rng = np.random.default_rng(seed)
    layer.lora_B.weight = asarray(rng.standard_normal(layer.lora_B.weight.shape))   # B = 0 would hide dA
    x = noncontiguous(rng.standard_normal(shape))
    return layer, x


class _SameMask(Module):
    """Runs ``layer`` with the dropout generator rewound before every forward: one mask for all of
    gradcheck's evaluations."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "state", layer.lora_dropout.rng.bit_generator.state)

    def forward(self, x):
        self.layer.lora_dropout.rng.bit_generator.state = self.state
        return self.layer(x)

    def backward(self, dy):
        return self.layer.backward(dy)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_lora_layer_gradcheck(backend, kind):
    layer, x = _lora(kind)
    report = gradcheck(layer, x, full_max=40)         # dx, dW, db, dA, dB: base trainable too
    assert report.passed, report


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_lora_layer_gradcheck_with_dropout(backend, kind):
    layer, x = _lora(kind, dropout=0.4, seed=1)
    report = gradcheck(_SameMask(layer), x, full_max=40)
    assert report.passed, report
    y = layer(x)
    base = to_numpy(layer.base_layer(x))
    assert relative_error(y, base) > 1e-3                            # the adapter is on
    layer.eval()
    delta = to_numpy(layer(x)) - base                                # eval: no dropout, s B A x
    full = np.einsum("...i,ri,or->...o", to_numpy(x), to_numpy(layer.lora_A.weight), to_numpy(layer.lora_B.weight)) \
        if kind == "linear" else None
    if full is not None:
        assert relative_error(delta, layer.scaling * full) < 1e-13


@pytest.mark.parametrize("kind", list(LAYERS))
def test_frozen_base_computes_adapter_grads_only(backend, kind):
    """requires_grad_(False) on the layer, True on the adapters: dA, dB, dx as with a trainable base, and
    no weight gradient of the base at all (not zeros: never computed)."""
    layer, x = _lora(kind)
    dy = asarray(np.random.default_rng(5).standard_normal(layer(x).shape))
    layer(x)
    dx_full = to_numpy(layer.backward(dy))
    want = {n: to_numpy(g).copy() for n, g in layer.named_grads() if "lora" in n}
    layer.zero_grad()
    layer.requires_grad_(False)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    layer(x)
    dx = to_numpy(layer.backward(dy))
    assert np.array_equal(dx, dx_full)
    assert layer.base_layer._grads["weight"] is None
    assert all(v is None for v in layer.base_layer._grads.values())
    for name in want:
        module, _, pname = name.rpartition(".")
        assert np.array_equal(to_numpy(dict(layer.named_modules())[module]._grads[pname]), want[name])


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_peft_initialization(kind):
    layer = LoraLayer(LAYERS[kind][0](), 4)
    a, b = to_numpy(layer.lora_A.weight), to_numpy(layer.lora_B.weight)
    fan_in = a[0].size                                        # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in)
    assert np.all(b == 0) and np.abs(a).max() <= fan_in ** -0.5 and np.abs(a).max() > 0.5 * fan_in ** -0.5
    assert layer.alpha == 4.0 and layer.scaling == 1.0
    x = asarray(np.random.default_rng(0).standard_normal(LAYERS[kind][1]).astype(np.float32))
    assert np.array_equal(to_numpy(layer(x)), to_numpy(layer.base_layer(x)))          # a new adapter changes nothing


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_fuse_matches_peft_merge_and_unfuse_restores(kind):
    layer, x = _lora(kind)
    layer.set_multiplier(0.7)
    build = {"linear": lambda: torch.nn.Linear(5, 6), "conv1x1": lambda: torch.nn.Conv2d(4, 5, 1),
             "conv3x3": lambda: torch.nn.Conv2d(3, 4, 3, padding=1)}[kind]
    from peft import inject_adapter_in_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = build()

    theirs = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3.0, target_modules=["layer"]), Holder()).double()
    with torch.no_grad():                                        # ours -> theirs, then scale 0.7 on both
        sd = {k: torch.from_numpy(to_numpy(v).copy()) for k, v in layer.state_dict().items()}
        theirs.layer.base_layer.weight.copy_(sd["base_layer.weight"])
        theirs.layer.base_layer.bias.copy_(sd["base_layer.bias"])
        theirs.layer.lora_A["default"].weight.copy_(sd["lora_A.weight"])
        theirs.layer.lora_B["default"].weight.copy_(sd["lora_B.weight"])
    theirs.layer.scaling["default"] *= 0.7
    w0 = to_numpy(layer.base_layer.weight).copy()
    y = to_numpy(layer(x))
    layer.fuse()
    theirs.layer.merge()
    assert relative_error(layer.base_layer.weight, theirs.layer.base_layer.weight.detach().numpy()) < 1e-14
    assert relative_error(layer(x), y) < 1e-13                  # fused: the base layer alone, same output
    with pytest.raises(ValueError, match="unfuse"):
        layer.set_multiplier(1.0)
    layer.unfuse()
    assert np.array_equal(to_numpy(layer.base_layer.weight), w0)


def test_lora_layer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="base must be a Linear or a Conv2d, got GroupNorm"):
        from npdiffusion.nn.norm import GroupNorm
        LoraLayer(GroupNorm(2, 4), 2)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoraLayer(Linear(2, 2), 0)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        LoraLayer(Linear(2, 2), 1, dropout=1.5)


# ----------------------------------------------------------------------------- whole models vs peft
UNET = dict(block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
            out_channels=4, in_channels=4, layers_per_block=1, sample_size=16)


def _peft_name(key: str) -> str:
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def _compare_with_peft(ours, theirs, adapters, prefix, inputs, t_inputs, run_ours, run_theirs):
    ours.load_state_dict({k.replace(".default", ""): v for k, v in torch_state_to_numpy(theirs).items()})
    out = run_ours(*inputs)
    t_out = run_theirs(*t_inputs)
    g = np.random.default_rng(7).standard_normal(t_out.shape)
    t_out.backward(torch.tensor(g))
    grads = ours.backward(asarray(g))
    grads = () if grads is None else grads            # the text model: token ids get no gradient
    errors = {"output": relative_error(out, t_out.detach().numpy())}
    for k, (gi, ti) in enumerate(zip(grads, [t for t in t_inputs if t.requires_grad])):
        errors[f"grad input[{k}]"] = relative_error(gi, ti.grad.numpy())
    t_grads = dict(theirs.named_parameters())
    for name, grad in adapters.named_grads():
        errors[name] = relative_error(grad, t_grads[_peft_name(name[len(prefix) + 1:])].grad.numpy(), floor=1e-12)
    assert len(errors) > len(list(adapters.named_parameters()))
    bad = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not bad, bad
    assert all(m.requires_grad is False or "lora_" in n for n, m in ours.named_modules() if m._parameters)
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {_peft_name(k[len(prefix) + 1:]) for k, _ in adapters.named_parameters()} == trainable


def test_unet_with_adapters_matches_diffusers_and_peft():
    """Attention projections, proj_in (a 1x1 conv) and the ResNets' 3x3 conv1, with a rank and an alpha
    pattern; diffusers' add_adapter with the same LoraConfig; every weight redrawn (B nonzero)."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
    with torch_threads(1):
        theirs = TorchUNet(**UNET).double()
        theirs.add_adapter(LoraConfig(r=3, lora_alpha=5, target_modules=targets, rank_pattern={"conv1": 2},
                                      alpha_pattern={"to_k": 7}))
        randomize_(theirs, seed=1)
        ours = UNet2DConditionModel(**UNET).to("float64")
        adapters = add_lora(ours, targets, 3, 5, rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 7})
        assert {layer.rank for k, layer in adapters.layers.items() if k.endswith("conv1")} == {2}
        rng = np.random.default_rng(0)
        x, ctx, t = rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8)), np.array([37, 14])
        tx, tc = torch.tensor(x, requires_grad=True), torch.tensor(ctx, requires_grad=True)
        _compare_with_peft(ours, theirs, adapters, "unet", (noncontiguous(x), t, ctx), (tx, tc),
                           lambda a, tt, c: ours(a, tt, c), lambda a, c: theirs(a, torch.tensor(t), c).sample)


def test_text_encoder_with_adapters_matches_transformers_and_peft():
    cfg = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=50,
               max_position_embeddings=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    with torch_threads(1):
        theirs = TorchCLIPTextModel(TorchCLIPTextConfig(**cfg)).double()
        theirs.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=targets))
        randomize_(theirs, seed=2)
        ours = CLIPTextModel(cfg).to("float64")
        adapters = add_lora(ours, targets, 2, 1, prefix="text_encoder")
        ids = np.random.default_rng(1).integers(3, 50, size=(2, 7))
        _compare_with_peft(ours, theirs, adapters, "text_encoder", (ids,), (torch.tensor(ids),),
                           lambda i: ours(i)[0], lambda i: theirs(i).last_hidden_state)


# ----------------------------------------------------------------------------- matching and removal
def test_target_matching_is_peft_rule_and_errors_name_the_problem():
    unet = UNet2DConditionModel(**UNET)
    names = matching_modules(unet, ["to_out.0", "attn2.to_k"])
    assert names and all(n.endswith(("to_out.0", "attn2.to_k")) for n in names)
    assert len([n for n in names if n.endswith("to_k")]) == len([n for n in names if "attn2.to_out" in n])
    assert matching_modules(unet, r".*attn1\.to_(q|v)") == [n for n in matching_modules(unet, ["to_q", "to_v"])
                                                           if ".attn1." in n]
    with pytest.raises(ValueError, match="match no Linear or Conv2d layer"):
        matching_modules(unet, ["to_qq"])
    with pytest.raises(TypeError, match="is a Attention; LoRA adapts Linear and Conv2d"):
        matching_modules(unet, ["attn1"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        matching_modules(unet, "to_(q")


def test_remove_lora_restores_the_model():
    unet = UNet2DConditionModel(**UNET)
    before = {k: to_numpy(v).copy() for k, v in unet.state_dict().items()}
    adapters = add_lora(unet, ["to_q", "conv1"], 2)
    assert any(k.endswith("to_q.base_layer.weight") for k in unet.state_dict())
    for _, p in adapters.named_parameters():
        p[...] = 0.5
    adapters.fuse()
    remove_lora(unet)
    after = unet.state_dict()
    assert list(after) == list(before) and all(np.array_equal(to_numpy(after[k]), before[k]) for k in before)
