"""``export_golden``: run a model once forward and once backward and write every tensor on the way.

What is written (docs/oracle.md; names in manifest.py): the inputs, the weights, every named
module's inputs and outputs in forward order (the layer recorder, npdiffusion/nn/recorder.py),
the model's outputs, the gradient of the loss

    L = sum over outputs k of sum(P_k * output_k),   P_k ~ N(0, 1) drawn from the seed

(so d L / d output_k = P_k, stored as ``output_grad/<k>``), every gradient the modules' backwards
receive and return, in backward order, every parameter gradient and the inputs' gradients.

Tolerances: the model is run a second time in the other precision (float32 when exporting float64
and vice versa), with the same weights and inputs cast, and each key's float32 error
e = max|x32 - x64| / max|x64| is measured. A key's recommended tolerance is
max(BASE_RTOL[dtype], SAFETY * e * EPS[dtype] / EPS[float32]): a correct float32 implementation
rounds about as much as ours; keys that are rounding noise (a gradient that is zero in exact
arithmetic) are marked ``"noise": true`` and get NOISE_SAFETY instead of SAFETY (two correct
implementations' noise differs by more than 10x).

Determinism: the same arguments give byte-identical files (seeded draws, sorted JSON, the
safetensors writer's fixed order, no timestamps).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy

from npdiffusion import __version__
from npdiffusion.backend import asarray, get_backend, is_array, to_numpy
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.safetensors import save_file
from npdiffusion.nn.module import Module, canonical_dtype
from npdiffusion.nn.recorder import record
from npdiffusion.oracle import manifest as mf
from npdiffusion.oracle.specs import GoldenCase, SchedulerCase, build_case, module_case

NOISE_LEVEL = 0.1          # a float32 error above this marks a key as rounding noise
MAX_RTOL = 1e30


def _host(a) -> numpy.ndarray:
    return numpy.array(to_numpy(a), copy=True)


def _cast_input(v, dtype):
    v = numpy.asarray(v)
    return asarray(v.astype(dtype)) if v.dtype.kind == "f" else asarray(v)


def _projections(outputs, seed) -> "OrderedDict[str, numpy.ndarray]":
    rng = numpy.random.default_rng([int(seed), 2])
    return OrderedDict((k, rng.standard_normal(tuple(numpy.shape(v)))) for k, v in outputs.items())


def _base_name(label: str) -> str:
    return label.split("#", 1)[0]


def _param_owners(model: Module) -> set:
    return {name for name, m in model.named_modules() if name and any(True for _ in m.named_parameters())}


class _Run:
    """One run's tensors: key -> (phase, host array), in order; plus layer names and the loss."""

    def __init__(self):
        self.tensors = OrderedDict()
        self.phases = {}
        self.required = set()
        self.layers = []
        self.loss = None

    def put(self, key, phase, array, required=False):
        self.tensors[key] = _host(array)
        self.phases[key] = phase
        if required:
            self.required.add(key)


def _run_module_case(case: GoldenCase, master: dict, dtype, seed) -> _Run:
    model = case.model
    model.to(dtype)
    model.load_state_dict(master)
    model.train()
    model.zero_grad()
    run = _Run()
    inputs = OrderedDict((k, _cast_input(v, dtype)) for k, v in case.inputs.items())
    for k, v in inputs.items():
        run.put(f"input/{k}", "input", v)
    for k, v in model.state_dict().items():
        run.put(f"param/{k}", "weights", v)
    owners = _param_owners(model)
    with record(model) as rec:
        outputs = OrderedDict((k, v if is_array(v) else asarray(numpy.asarray(v, dtype=dtype)))
                              for k, v in case.forward(model, inputs).items() if v is not None)
        proj = _projections(outputs, seed)
        grads = OrderedDict((k, asarray(p.astype(dtype))) for k, p in proj.items())
        in_grads = case.backward(model, grads) or {}
    modules = dict(model.named_modules())
    run.layers = [(label, type(modules[_base_name(label)]).__name__) for label in rec.layers]

    def required_layer(key):
        head, rest = key.split("/", 1)
        label, leaf = rest.rsplit("/", 1)
        return leaf.startswith("output") and _base_name(label) in owners

    for k, v in rec.forward.items():
        run.put(k, "forward", v, required_layer(k))
    for k, v in outputs.items():
        run.put(f"output/{k}", "output", v, True)
    for k, v in grads.items():
        run.put(f"output_grad/{k}", "output_grad", v)
    final = OrderedDict((f"param_grad/{k}", g) for k, g in model.named_grads())
    for k, v in rec.backward.items():
        if k.startswith("param_grad/"):
            run.put(k, "backward", final[k], True)
        else:
            run.put(k, "backward", v, required_layer(k))
    for k, g in final.items():
        if k not in run.tensors:
            run.put(k, "backward", g, True)
    for k in case.inputs:
        g = in_grads.get(k)
        if g is not None:
            run.put(f"input_grad/{k}", "input_grad", g, True)
    loss = sum(float(numpy.sum(to_numpy(outputs[k]).astype(numpy.float64) * proj[k])) for k in outputs)
    run.put("loss", "loss", numpy.asarray(loss, dtype=numpy.float64))
    run.loss = loss
    return run


def _run_scheduler_case(case: SchedulerCase, dtype, seed) -> _Run:
    sched = case.make()
    sched.set_timesteps(case.num_inference_steps)
    timesteps = list(numpy.asarray(to_numpy(sched.timesteps)))
    rng = numpy.random.default_rng([int(seed), 1])
    run = _Run()
    x = asarray(rng.standard_normal(case.sample_shape).astype(dtype))
    run.put("input/sample", "input", x)
    stochastic = case.stochastic
    noises = []
    if stochastic:
        for k in range(len(timesteps)):
            noises.append(asarray(rng.standard_normal(case.sample_shape).astype(dtype)))
            run.put(f"input/noise.{k}", "input", noises[-1])
    run.put("act/schedule/timesteps", "forward", numpy.asarray(timesteps), True)
    for attr in ("alphas_cumprod", "sigmas"):
        value = getattr(sched, attr, None)
        if value is not None:
            run.put(f"act/schedule/{attr}", "forward", numpy.asarray(to_numpy(value)))
    run.put("act/schedule/init_noise_sigma", "forward", numpy.asarray(float(sched.init_noise_sigma)))
    run.layers = [("schedule", case.scheduler_class)]
    x = x * float(sched.init_noise_sigma)
    for k, t in enumerate(timesteps):
        m = sched.scale_model_input(x, t)
        eps = m * (float(t) / (float(t) + 1.0))
        out = sched.step(eps, t, x, noise=noises[k]) if stochastic else sched.step(eps, t, x)
        run.put(f"act/step.{k}/model_input", "forward", m, True)
        run.put(f"act/step.{k}/model_output", "forward", eps)
        run.put(f"act/step.{k}/prev_sample", "forward", out.prev_sample, True)
        pred = getattr(out, "pred_original_sample", None)
        if pred is not None:
            run.put(f"act/step.{k}/pred_original_sample", "forward", pred)
        run.layers.append((f"step.{k}", case.scheduler_class))
        x = out.prev_sample
    run.put("output/sample", "output", x, True)
    return run


def _f32_error(a, b) -> float:
    """max|a - b| / max|b| on the host in float64 (0 when both are all zeros, inf when only b is)."""
    a = numpy.asarray(a, dtype=numpy.float64)
    b = numpy.asarray(b, dtype=numpy.float64)
    if a.shape != b.shape or a.size == 0:
        return 0.0
    diff = float(numpy.max(numpy.abs(a - b)))
    scale = float(numpy.max(numpy.abs(b)))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def _per_dtype(float32_error: float) -> dict:
    """A float32 rounding error and what it becomes in float64 (times the ratio of the epsilons)."""
    return {kind: float32_error * mf.EPS[kind] / mf.EPS["float32"] for kind in ("float32", "float64")}


def _tolerances(err: float) -> dict:
    safety = mf.NOISE_SAFETY if err > NOISE_LEVEL else mf.SAFETY
    out = {}
    for kind, scaled in _per_dtype(safety * err).items():
        t = max(mf.BASE_RTOL[kind], scaled)
        out[kind] = float(min(t, MAX_RTOL)) if numpy.isfinite(t) else MAX_RTOL
    return out


def _noise_atol(a32, a64) -> dict:
    """Absolute tolerances of a rounding-noise key: NOISE_SAFETY times its measured float32 noise
    max|x32 - x64|; the relative tolerance alone has no bound when the golden value is exactly 0."""
    noise = float(numpy.max(numpy.abs(numpy.asarray(a32, numpy.float64) - numpy.asarray(a64, numpy.float64))))
    return {kind: float(v) for kind, v in _per_dtype(mf.NOISE_SAFETY * noise).items()}


def _dtype_name(a) -> str:
    return numpy.dtype(a.dtype).name


def export_golden(model_or_spec, out_dir, dtype="float64", seed: int = 0, *, config=None, from_pretrained=None,
                  inputs=None) -> dict:
    """Write a golden folder for ``model_or_spec`` into ``out_dir`` and return its manifest.

    ``model_or_spec``: "unet", "vae", "text-encoder", "clip", "op:NAME", "scheduler:NAME", a
    ``GoldenCase``, or an npdiffusion Module together with ``inputs`` (a mapping of input names to
    arrays; the module is called positionally). ``dtype``: "float64" (default) or "float32".
    ``seed``: weights, inputs and the loss projections. ``config``: a dict or JSON file for the
    built-in names; ``from_pretrained``: a model folder instead of random weights.
    """
    dt = canonical_dtype(dtype)
    if dt.name not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dt.name}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(model_or_spec, Module):
        if inputs is None:
            raise ValueError("export_golden: a Module needs inputs= (a mapping of input names to arrays)")
        case = module_case(model_or_spec, inputs)
    elif isinstance(model_or_spec, (GoldenCase, SchedulerCase)):
        case = model_or_spec
    else:
        case = build_case(model_or_spec, config=config, from_pretrained=from_pretrained, seed=seed)
    other = "float32" if dt.name == "float64" else "float64"

    if isinstance(case, SchedulerCase):
        golden = _run_scheduler_case(case, dt.name, seed)
        measure = _run_scheduler_case(case, other, seed)
        loss_doc = None
    else:
        master = OrderedDict((k, _host(v)) for k, v in case.model.state_dict().items())
        original = case.model.dtype
        try:
            golden = _run_module_case(case, master, dt.name, seed)
            measure = _run_module_case(case, master, other, seed)
        finally:
            case.model.to(original)
            case.model.load_state_dict(master)
        loss_doc = {
            "definition": "L = sum over outputs k of sum(output_grad/<k> * output/<k>); output_grad/<k> ~ N(0, 1) "
                          "drawn from numpy.random.default_rng([seed, 2]) in output order",
            "outputs": [k.split("/", 1)[1] for k in golden.tensors if golden.phases[k] == "output"],
            "value": golden.loss,
        }
    f32 = golden if dt.name == "float32" else measure
    f64 = measure if dt.name == "float32" else golden

    keys = []
    for key, arr in golden.tensors.items():
        err = _f32_error(f32.tensors[key], f64.tensors[key]) if key in f32.tensors else 0.0
        entry = {
            "key": key, "phase": golden.phases[key], "layer": mf.layer_of(key), "required": key in golden.required,
            "shape": list(arr.shape), "dtype": _dtype_name(arr), "rtol": _tolerances(err),
            "float32_error": float(min(err, MAX_RTOL)),
        }
        if err > NOISE_LEVEL:
            entry["noise"] = True
            entry["atol"] = _noise_atol(f32.tensors[key], f64.tensors[key])
        keys.append(entry)
    manifest = {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION,
        "library": {"name": "npdiffusion", "version": __version__, "backend": get_backend()},
        "model": case.name, "class": case.class_name, "config": case.config, "dtype": dt.name, "seed": int(seed),
        "from_pretrained": (None if from_pretrained is None
                            else os.path.basename(os.path.normpath(os.fspath(from_pretrained)))),
        "notes": case.notes,
        "loss": loss_doc,
        "tolerances": {"base_rtol": dict(mf.BASE_RTOL), "safety": mf.SAFETY, "noise_safety": mf.NOISE_SAFETY,
                       "rule": "pass when max|candidate - golden| <= rtol * max|golden| for each key; rtol per key "
                               "and candidate dtype in keys[i].rtol"},
        "files": {"tensors": mf.TENSORS, "config": mf.CONFIG},
        "layers": [{"name": n, "class": c} for n, c in golden.layers],
        "keys": keys,
    }
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(golden.tensors, os.path.join(out_dir, mf.TENSORS), metadata={"format": mf.FORMAT})
    atomic_write_text(os.path.join(out_dir, mf.CONFIG), mf.dumps({"_class_name": case.class_name, **case.config}))
    atomic_write_text(os.path.join(out_dir, mf.MANIFEST), mf.dumps(manifest))
    return manifest
