"""``npdiffusion demo --quick``: every output is written, the report holds both accuracy tables, the
model folder loads in diffusers' StableDiffusionPipeline and gives our images from the same latents."""
import json
import os

import numpy as np
import pytest

from npdiffusion.cli import main
from npdiffusion.training.demo import random_prompts, run_demo, stage_configs


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(str(out), quick=True, progress=False, log=lambda *a: None)
    return out, summary


def test_quick_demo_writes_every_output(quick_demo):
    out, summary = quick_demo
    assert summary.startswith("demo: trained") and "with guidance" in summary and str(out) in summary
    for name in ("samples.png", "diffusion.png", "losses.png", "report.md", "model/model_index.json",
                 "configs/unet.toml", "runs/unet/losses.csv"):
        assert os.path.getsize(out / name) > 0, name
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    report = (out / "report.md").read_text()
    for word in ("| guided |", "| unguided |", "| colour |", "| unet |", "| vae |", "| clip |", "| total |"):
        assert word in report, word
    from PIL import Image

    samples = Image.open(out / "samples.png")
    assert samples.size[0] >= 4 * 128                       # four seed columns of at least 128 px


def test_written_configs_rerun_the_stages(quick_demo):
    """configs/*.toml read back into the same configs (the files are a faithful record of the run)."""
    from npdiffusion.training.config import config_to_dict, load_config
    from npdiffusion.training.stages import load_stage

    out, _ = quick_demo
    for name, cfg in stage_configs(str(out), quick=True).items():
        again = load_config(out / "configs" / f"{name}.toml", load_stage(name).CONFIG)
        assert config_to_dict(again) == config_to_dict(cfg), name


def deterministic(ours, theirs):
    """The demo folder's sampler is stochastic (DPM-Solver++ 2M SDE), and torch and NumPy draw different noise:
    both pipelines get its ODE form, the same steps without the noise (the SDE form's own parity with diffusers:
    tests/test_schedulers_parity.py)."""
    ours.scheduler = type(ours.scheduler).from_config({**ours.scheduler.config, "algorithm_type": "dpmsolver++"})
    theirs.scheduler = type(theirs.scheduler).from_config(theirs.scheduler.config, algorithm_type="dpmsolver++")


def test_model_folder_loads_in_diffusers_with_the_same_images(quick_demo):
    diffusers = pytest.importorskip("diffusers")
    import torch

    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    out, _ = quick_demo
    folder = str(out / "model")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    assert type(theirs.scheduler).__name__ == type(ours.scheduler).__name__
    assert theirs.scheduler.config.algorithm_type == ours.scheduler.config["algorithm_type"] == "sde-dpmsolver++"
    deterministic(ours, theirs)
    prompts = random_prompts(2, seed=7)
    channels = ours.unet.config["in_channels"]
    latents = np.random.default_rng(3).standard_normal((2, channels, 8, 8)).astype(np.float32)
    mine = ours(prompts, num_inference_steps=5, guidance_scale=3.0, latents=latents, output_type="np",
                progress=False).images
    with torch.no_grad():
        ref = theirs(prompts, num_inference_steps=5, guidance_scale=3.0, latents=torch.from_numpy(latents),
                     output_type="np").images
    assert mine.shape == ref.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(mine, ref, atol=2e-4)


def test_model_folder_converts_to_a_single_file_diffusers_loads_with_the_same_images(quick_demo, tmp_path):
    """Issue 22: ``npdiffusion convert`` of the demo's folder (8 latent channels, no VAE mid attention, 4 groups)
    gives a single file that diffusers' from_single_file (config: the folder) runs to the same images."""
    import diffusers  # the oracle (test extra): a parity check is never skipped
    import torch

    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    out, _ = quick_demo
    folder, single = str(out / "model"), str(tmp_path / "demo.safetensors")
    assert main(["convert", folder, single]) == 0
    theirs = diffusers.StableDiffusionPipeline.from_single_file(single, config=folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    deterministic(ours, theirs)
    prompts = random_prompts(2, seed=7)
    latents = np.random.default_rng(3).standard_normal((2, ours.unet.config["in_channels"], 8, 8)).astype(np.float32)
    mine = ours(prompts, num_inference_steps=5, guidance_scale=3.0, latents=latents, output_type="np",
                progress=False).images
    with torch.no_grad():
        ref = theirs(prompts, num_inference_steps=5, guidance_scale=3.0, latents=torch.from_numpy(latents),
                     output_type="np").images
    assert np.abs(mine - ref).max() <= 1e-4


def test_cli_refuses_an_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--quick", "--no-progress", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo" in err[0]


def test_repository_configs_are_the_demo_settings():
    """configs/shapes/*.toml (documented defaults of each stage for the shapes) stay the demo's settings."""
    from npdiffusion.training.config import config_to_dict, load_config
    from npdiffusion.training.stages import load_stage

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, cfg in stage_configs(".").items():
        ours = load_config(os.path.join(root, "configs", "shapes", f"{name}.toml"), load_stage(name).CONFIG)
        want = json.loads(json.dumps(config_to_dict(cfg)).replace('"./runs/', '"runs/'))
        assert config_to_dict(ours) == want, name


def test_cli_refuses_to_overwrite_an_earlier_run(quick_demo, capsys):
    out, _ = quick_demo
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a demo run" in err[0]
