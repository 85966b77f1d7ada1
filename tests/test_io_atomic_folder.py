"""Model folders are written atomically: after a kill at any moment a folder is the complete old version,
the complete new one, or (first export) absent; never a new config.json next to old weights.

Two crash tests (issue #17, point 3):

* deterministic: a forked child saves a tiny VAE and ``os._exit``s just before its k-th file-system
  call (open, fsync, rename, mkdir, unlink, rmdir, the atomic exchange), for every k until the save
  completes; after each crash the folder is checked, for a first export and for a rewrite, with the
  atomic exchange and with the two-rename fallback (which needs the next writer's recovery);
* random: a forked child saves a tiny Stable Diffusion pipeline over and over (rewrites, and first
  exports into fresh folders) and is SIGKILLed after a delay drawn from a seeded RNG.
"""
import os
import shutil
import signal
import time

import numpy as np
import pytest

from npdiffusion.io import atomic_folder as af
from npdiffusion.io.atomic import remove_stale_temps
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.random import manual_seed

KILLED = 77
FS_CALLS = ("open", "fsync", "rename", "replace", "mkdir", "unlink", "rmdir")


def tree(folder) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def tiny_vae(seed: int, scaling_factor: float) -> AutoencoderKL:
    manual_seed(seed)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2,
                         scaling_factor=scaling_factor)


def run_in_child(fn) -> int:
    """Run ``fn()`` in a forked child; its exit code (0 when ``fn`` returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to pytest
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def crash_before_call(k: int, exchange: bool):
    """Patch the file-system calls (in the child) so the k-th of them ends the process at once.
    ``fsync`` is counted but does nothing: it matters for power loss, not for a killed process
    (whose written pages the kernel keeps), and skipping it keeps the test fast."""
    count = [0]
    os.fsync = lambda fd: None

    def counted(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(KILLED)
            return real(*args, **kwargs)
        return call

    for name in FS_CALLS:
        setattr(os, name, counted(getattr(os, name)))
    af.exchange_folders = counted(af.exchange_folders if exchange else (lambda a, b: False))


def assert_old_or_new(final, versions, *, allow_missing):
    """``final`` holds exactly one of ``versions`` ({name: tree}) and loads; returns its name."""
    if not os.path.exists(final):
        assert allow_missing, f"{final} vanished"
        return None
    got = tree(final)
    match = [name for name, t in versions.items() if t == got]
    assert match, f"{final} is a mixture: {sorted(got)}"
    model = AutoencoderKL.from_pretrained(final)
    assert model.config["scaling_factor"] == {"old": 0.5, "new": 0.25}[match[0]]
    return match[0]


@pytest.mark.parametrize("first, exchange", [(True, True), (False, True), (False, False)],
                         ids=["first-export", "rewrite-exchange", "rewrite-two-renames"])
def test_vae_save_killed_before_every_file_system_call(tmp_path, first, exchange):
    old, new = tiny_vae(0, 0.5), tiny_vae(1, 0.25)
    versions = {}
    for name, model in (("old", old), ("new", new)):
        model.save_pretrained(tmp_path / "ref" / name)
        versions[name] = tree(tmp_path / "ref" / name)
    assert versions["old"]["config.json"] != versions["new"]["config.json"]
    seen = set()
    for k in range(1, 500):
        parent = tmp_path / f"k{k}"
        parent.mkdir()
        final = str(parent / "vae")
        if not first:
            shutil.copytree(tmp_path / "ref" / "old", final)

        def save(k=k, final=final):
            crash_before_call(k, exchange)
            new.save_pretrained(final)

        code = run_in_child(save)
        assert code in (0, KILLED)
        if exchange or first:  # a reader right after the kill, before anyone cleans up
            seen.add(assert_old_or_new(final, versions, allow_missing=first))
        else:  # two renames: the one gap is a missing folder whose complete backup waits beside it
            if os.path.exists(final):
                seen.add(assert_old_or_new(final, versions, allow_missing=False))
            else:
                backups = [e for e in os.listdir(parent) if e.startswith(".vae.") and e.endswith(".old")]
                assert len(backups) == 1 and tree(parent / backups[0]) == versions["old"]
                seen.add("backup")
        af.remove_stale_folders(parent)  # what the next writer does first
        state = assert_old_or_new(final, versions, allow_missing=first)
        assert sorted(os.listdir(parent)) == ([] if state is None else ["vae"])
        if code == 0:
            break
    else:
        pytest.fail("the save never completed")
    assert state == "new" and k > 10
    expected = {None, "new"} if first else {"old", "new"} if exchange else {"old", "new", "backup"}
    assert expected <= seen  # every kind of moment was hit (the two-renames gap, and recovered)
    print(f"{k - 1} crash points checked; states seen {sorted(map(str, seen))}")


# ------------------------------------------------------------------ random SIGKILL of a pipeline save
def tiny_pipeline(seed: int, sample_size: int):
    from npdiffusion.models.clip.bpe_train import train_bpe
    from npdiffusion.models.clip.text_model import CLIPTextModel
    from npdiffusion.models.clip.tokenizer import CLIPTokenizer
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline
    from npdiffusion.schedulers.ddim import DDIMScheduler

    manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size,
                                in_channels=4, out_channels=4, cross_attention_dim=8, norm_num_groups=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    text = CLIPTextModel(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                         num_hidden_layers=2, pad_token_id=1, vocab_size=1000)
    vocab, merges = train_bpe(["a red cat", "a blue dog", "red dog"], 530, 1)
    return StableDiffusionPipeline(tiny_vae(seed, 0.5), text, CLIPTokenizer(vocab, merges), unet,
                                   DDIMScheduler(beta_end=0.012 + 0.001 * seed))


def kill_after(rng, fn, upto: float) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child loops until killed
        try:
            fn()
        finally:
            os._exit(3)
    time.sleep(float(rng.uniform(0.0, upto)))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, "the saving child died by itself"


def test_pipeline_save_sigkilled_at_random_moments(tmp_path):
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    pipes = [tiny_pipeline(0, 8), tiny_pipeline(1, 16)]
    refs = []
    for i, pipe in enumerate(pipes):
        refs.append(tree(pipe.save_pretrained(tmp_path / f"ref{i}")))
    t0 = time.perf_counter()
    pipes[0].save_pretrained(tmp_path / "probe")
    upto = 2 * (time.perf_counter() - t0) + 0.02      # kills spread over about two saves
    rng = np.random.default_rng(17)

    def which(folder) -> int:
        got = tree(folder)
        assert got in refs, f"{folder} is a mixture of versions"
        index = refs.index(got)
        loaded = StableDiffusionPipeline.from_pretrained(folder)
        assert loaded.unet.config["sample_size"] == (8, 16)[index]
        np.testing.assert_array_equal(loaded.unet.state_dict()["conv_in.weight"],
                                      pipes[index].unet.state_dict()["conv_in.weight"])
        return index

    mid_write = 0
    rewrite = tmp_path / "rewrite"
    pipes[0].save_pretrained(rewrite / "model")
    for _ in range(10):  # re-exports over a complete old folder
        def loop():
            for i in range(1, 10**6):
                pipes[i % 2].save_pretrained(rewrite / "model")
        kill_after(rng, loop, upto)
        which(rewrite / "model")
        mid_write += bool(af.remove_stale_folders(rewrite))
        assert os.listdir(rewrite) == ["model"]
    for trial in range(10):  # first exports: each into a new folder
        parent = tmp_path / f"first{trial}"
        parent.mkdir()

        def exports(parent=parent):
            for i in range(10**6):
                pipes[i % 2].save_pretrained(parent / f"model{i}")
        kill_after(rng, exports, upto)
        done = sorted(int(e[len("model"):]) for e in os.listdir(parent) if e.startswith("model"))
        assert done == list(range(len(done)))            # every started export before the last one finished
        for i in done:
            assert which(parent / f"model{i}") == i % 2
        mid_write += bool(af.remove_stale_folders(parent))
        assert len(os.listdir(parent)) == len(done)
    assert mid_write >= 5, f"only {mid_write} of 20 kills landed inside a write"
    print(f"{mid_write} of 20 kills landed inside a write")


# ------------------------------------------------------------------ the rules around the swap
def test_failed_body_leaves_the_old_folder(tmp_path):
    final = tmp_path / "vae"
    tiny_vae(0, 0.5).save_pretrained(final)
    before = tree(final)
    with pytest.raises(RuntimeError, match="boom"):
        with af.atomic_folder(final) as tmp:
            tiny_vae(1, 0.25).save_pretrained(tmp)
            raise RuntimeError("boom")
    assert tree(final) == before and os.listdir(tmp_path) == ["vae"]


def test_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="none of the model files"):
        tiny_vae(0, 0.5).save_pretrained(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tiny_vae(0, 0.5).save_pretrained(tmp_path / "file")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file", "run"]


def test_symlinked_folder_keeps_its_link(tmp_path):
    (tmp_path / "store").mkdir()
    tiny_vae(0, 0.5).save_pretrained(tmp_path / "store" / "vae")
    os.symlink(tmp_path / "store" / "vae", tmp_path / "vae")
    tiny_vae(1, 0.25).save_pretrained(tmp_path / "vae")
    assert os.path.islink(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "store" / "vae").config["scaling_factor"] == 0.25
    assert os.listdir(tmp_path / "store") == ["vae"]


def test_stale_temp_folders_of_dead_writers_only_are_cleaned(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max
    live = tmp_path / f".vae.{os.getpid()}.{'a' * 16}.tmp"
    stale = tmp_path / f".vae.{dead}.{'b' * 16}.tmp"
    orphan_backup = tmp_path / f".unet.{dead}.{'c' * 16}.old"
    for d in (live, stale, orphan_backup):
        d.mkdir()
        (d / "config.json").write_text("{}")
    assert remove_stale_temps(tmp_path) == []       # the file cleaner leaves folders alone
    tiny_vae(0, 0.5).save_pretrained(tmp_path / "vae")   # the next writer cleans up first
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, "unet", "vae"])
    assert (tmp_path / "unet" / "config.json").read_text() == "{}"   # the backup restored


def test_save_in_the_working_directory_follows_the_new_folder(tmp_path, monkeypatch):
    tiny_vae(0, 0.5).save_pretrained(tmp_path / "vae")
    monkeypatch.chdir(tmp_path / "vae")
    tiny_vae(1, 0.25).save_pretrained(".")
    assert os.path.samefile(os.getcwd(), tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(".").config["scaling_factor"] == 0.25
