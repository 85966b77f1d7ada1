"""Golden vectors and a divergence finder for other implementations of Stable Diffusion (docs/oracle.md).

    export_golden(model_or_spec, out_dir, dtype="float64", seed=0, config=..., from_pretrained=...)
        writes out_dir/{manifest.json, golden.safetensors, config.json}: weights, inputs, outputs,
        every layer's activations and gradients by module name, parameter and input gradients
    check_golden(golden_dir, candidate) -> CheckReport
        compares another implementation's dump (same key names) with the golden one: a per-key
        table in forward then backward order and the first layer that diverges

The command line twin is ``npdiffusion golden export|check``; the layer capture is
``npdiffusion.nn.recorder.record``; a torch dumper is tools/torch_golden_dump.py.
"""
from npdiffusion.oracle.check import CheckReport, KeyResult, check_golden
from npdiffusion.oracle.export import export_golden
from npdiffusion.oracle.manifest import GoldenFormatError, read_manifest
from npdiffusion.oracle.specs import GoldenCase, build_case, module_case, randomize_weights

__all__ = ["export_golden", "check_golden", "CheckReport", "KeyResult", "GoldenFormatError", "read_manifest",
           "GoldenCase", "build_case", "module_case", "randomize_weights"]
