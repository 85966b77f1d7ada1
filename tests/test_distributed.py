"""Data-parallel training (docs/distributed.md): the single-process communicator, flat buffers, the
batch shards and sample-tied draws without MPI; then the CLIP, U-Net and VAE stages run by
``mpiexec -n 2 npdiffusion train STAGE`` (a subprocess) against one process with the same global
batch: 30 steps in float64 end within 1e-9 relative (max over parameters), and the tokenizer stage
writes the same files. The MPI cases skip, with
the reason, when mpi4py or mpiexec is not installed (pip install -e ".[mpi]")."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npdiffusion.data.loader import DataLoader
from npdiffusion.distributed import BatchDraws, Shard, SingleProcess, batch_draws, get_communicator
from npdiffusion.distributed import flat
from npdiffusion.io.pretrained import load_weights
from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage
from npdiffusion.training.config import DataConfig, TrainConfig, load_config
from npdiffusion.training.loop import read_history_csv
from npdiffusion.training.stages import run_model_stage



# ============================================================================ without MPI
class _Images:
    def __init__(self, n):
        self.captions = [f"c{i}" for i in range(n)]

    def __len__(self):
        return len(self.captions)

    def get_images(self, idx):
        return np.zeros((len(idx), 2, 2, 3), dtype=np.uint8)


def test_single_process_communicator_changes_nothing():
    comm = SingleProcess()
    assert (comm.rank, comm.size, comm.is_root) == (0, 1, True)
    assert comm.shard(8) == Shard(0, 8, 8)
    buf = np.arange(5.0)
    comm.allreduce_sum_(buf)
    comm.broadcast_(buf)
    comm.barrier()
    np.testing.assert_array_equal(buf, np.arange(5.0))
    metrics = {"loss": 0.5, "kl": 2.0}
    assert comm.average_gradients(object(), metrics) is metrics     # not even the module is touched
    comm.broadcast_parameters(object())
    with pytest.raises(ValueError, match="root must be 0"):
        comm.broadcast_(buf, root=1)
    assert isinstance(get_communicator(), SingleProcess)            # pytest is not started by mpiexec


def test_shards_split_the_batch_and_refuse_an_uneven_split():
    assert [Shard.of(8, r, 4) for r in range(4)] == [Shard(2 * r, 2 * r + 2, 8) for r in range(4)]
    with pytest.raises(ValueError, match="batch_size 6 must be divisible by the number of processes 4"):
        Shard.of(6, 0, 4)


def test_draws_are_tied_to_the_sample_not_the_rank():
    def one(shard):
        rng = np.random.default_rng(7)
        d = BatchDraws(rng, shard)
        return d.standard_normal((2, 3)), d.random(), d.integers(0, 1000), d.standard_normal((2,)), rng.random()

    whole = one(Shard.whole(6))
    rng = np.random.default_rng(7)   # N = 1 draws exactly what the stages drew before sharding
    expected = (rng.standard_normal((6, 2, 3)), rng.random(6), rng.integers(0, 1000, 6), rng.standard_normal((6, 2)),
                rng.random())
    for got, want in zip(whole, expected):
        np.testing.assert_array_equal(got, want)
    for n in (2, 3):
        parts = [one(Shard.of(6, r, n)) for r in range(n)]
        for k in range(4):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        assert all(p[4] == whole[4] for p in parts)                 # the generator ends in one state
    batch = type("B", (), {"indices": np.arange(4)})()
    assert batch_draws(np.random.default_rng(0), batch).shard == Shard.whole(4)


def test_flat_buffers_round_trip_per_dtype():
    arrays = [np.arange(6.0).reshape(2, 3), np.ones(4, np.float32), np.full((1, 2), 5.0)]
    buckets = flat.pack(arrays)
    assert [(d, b.size) for d, b, _ in buckets] == [(np.dtype(np.float64), 8), (np.dtype(np.float32), 4)]
    for _, b, _ in buckets:
        b *= 2
    flat.unpack(buckets, arrays)
    np.testing.assert_array_equal(arrays[0], 2 * np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(arrays[1], np.full(4, 2, np.float32))
    np.testing.assert_array_equal(arrays[2], np.full((1, 2), 10.0))


def test_sharded_loaders_together_see_the_global_batches_and_keep_one_state():
    ds = _Images(20)
    whole = DataLoader(ds, 8, seed=3, prefetch=0)
    ranks = [DataLoader(ds, 8, seed=3, prefetch=2, shard=Shard.of(8, r, 2)) for r in range(2)]
    for _ in range(5):                                              # across an epoch boundary (2 batches/epoch)
        b = next(whole)
        parts = [next(loader) for loader in ranks]
        np.testing.assert_array_equal(np.concatenate([p.indices for p in parts]), b.indices)
        assert [p.shard for p in parts] == [Shard(0, 4, 8), Shard(4, 8, 8)]
    states = [loader.state_dict() for loader in [whole] + ranks]
    for s in states[1:]:
        assert {k: v for k, v in s.items() if k != "order"} == {k: v for k, v in states[0].items() if k != "order"}
        np.testing.assert_array_equal(s["order"], states[0]["order"])
    for loader in ranks:
        loader.close()


# ============================================================================ under mpiexec -n 2
def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.isfile(here) else shutil.which("mpiexec")


MPI_MISSING = ("mpi4py is not installed" if importlib.util.find_spec("mpi4py") is None
               else "no mpiexec on PATH or next to this Python" if _mpiexec() is None else None)
needs_mpi = pytest.mark.skipif(MPI_MISSING is not None,
                               reason=f"{MPI_MISSING}: pip install -e \".[mpi]\" (mpich and mpi4py) to run the 2-rank tests")

DATA = DataConfig(num_images=48, resolution=16, seed=3)
TRAIN = {"steps": 30, "batch_size": 8, "learning_rate": 3e-3, "checkpointing_steps": 10, "seed": 1,
         "dtype": "float64", "use_ema": True, "ema_decay": 0.9, "max_grad_norm": 0.5}


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _write_config(path, output_dir, sections):
    lines = [f"output_dir = {_toml_value(str(output_dir))}"]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _mpirun(n, *args, cwd, env=None):
    """``mpiexec -n n python -m npdiffusion args`` (n = 0: without mpiexec), one thread per rank."""
    cmd = ([_mpiexec(), "-n", str(n)] if n else []) + [sys.executable, "-m", "npdiffusion", *args]
    env = {**os.environ, "NPDIFFUSION_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


#: CLIP's attention key bias: softmax_j(q_i . (k_j + c)) does not depend on c, so its exact gradient is 0
#: and its value is rounding noise (~1e-12 after 30 steps, a different noise for another summation
#: order): it is checked to stay that small instead of being compared relatively
ZERO_GRADIENT = ("self_attn.k_proj.bias",)


def _max_relative(a, b):
    assert a.keys() == b.keys()
    noise = [k for k in a if k.endswith(ZERO_GRADIENT)]
    assert all(np.abs(a[k]).max() < 1e-9 and np.abs(b[k]).max() < 1e-9 for k in noise), noise
    return max(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-300) for k in a if k not in noise)


def _train_one_process_and_two_ranks(stage, tmp_path, sections):
    """The same config trained by one process into tmp_path/one and by 2 ranks into tmp_path/two;
    returns the mpiexec run."""
    one = _write_config(tmp_path / "one.toml", tmp_path / "one", sections)
    two = _write_config(tmp_path / "two.toml", tmp_path / "two", sections)
    module = {"clip": clip_stage, "unet": unet_stage, "vae": vae_stage}[stage]
    module.train(load_config(one, module.CONFIG), progress=False, log=lambda *a: None)
    run = _mpirun(2, "train", stage, "--config", two, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def _assert_n_ranks_match_one(stage, tmp_path, sections, subfolder):
    run = _train_one_process_and_two_ranks(stage, tmp_path, sections)
    assert run.stdout.count(f"{stage}: 30 steps") == 1, run.stdout     # rank 0 alone reports
    for sub in (f"checkpoint-30/{subfolder}", subfolder):               # the raw weights, then the EMA export
        err = _max_relative(load_weights(tmp_path / "two" / sub), load_weights(tmp_path / "one" / sub))
        assert err < 1e-9, (sub, err)
    a = read_history_csv(str(tmp_path / "two" / "losses.csv"))
    b = read_history_csv(str(tmp_path / "one" / "losses.csv"))
    assert len(a) == len(b) == 30
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-9)
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-9)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def _data():
    return {"num_images": DATA.num_images, "resolution": DATA.resolution, "seed": DATA.seed}


@needs_mpi
def test_vae_stage_on_two_ranks_equals_one_process(tmp_path):
    _assert_n_ranks_match_one("vae", tmp_path, {
        "data": _data(), "train": TRAIN,
        "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2}}, "vae")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A tokenizer, a tiny CLIP and a tiny VAE (the U-Net stage's frozen inputs), one process."""
    root = tmp_path_factory.mktemp("frozen")
    quick = TrainConfig(steps=2, batch_size=8, checkpointing_steps=2, seed=1)
    tokenizer_stage.train(tokenizer_stage.CONFIG(output_dir=str(root / "tok"), data=DATA,
                                                 tokenizer=tokenizer_stage.TokenizerOptions(model_max_length=12)))
    clip_stage.train(clip_stage.CONFIG(output_dir=str(root / "clip"), data=DATA, train=quick,
                                       clip=clip_stage.CLIPOptions(tokenizer=str(root / "tok" / "tokenizer"),
                                                                   text_hidden_size=16, text_layers=1, text_heads=2,
                                                                   text_intermediate_size=32, vision_hidden_size=16,
                                                                   vision_layers=1, vision_heads=2,
                                                                   vision_intermediate_size=32, patch_size=8,
                                                                   projection_dim=16)),
                     progress=False, log=lambda *a: None)
    run_model_stage(vae_stage.CONFIG(output_dir=str(root / "vae"), data=DATA, train=quick,
                                     vae=vae_stage.VAEOptions(block_out_channels=(8, 8), norm_num_groups=4)),
                    vae_stage.build_stage, progress=False, log=lambda *a: None)
    return root


def _unet_sections(root, **train):
    return {"data": _data(), "train": {**TRAIN, **train},
            "unet": {"vae": str(root / "vae" / "vae"), "text_encoder": str(root / "clip" / "text_encoder"),
                     "tokenizer": str(root / "clip" / "tokenizer"), "block_out_channels": [8, 16],
                     "norm_num_groups": 4, "attention_head_dim": 4, "caption_dropout": 0.25, "snr_gamma": 5.0}}


def _train_unet_here(config, resume=False):
    unet_stage.train(load_config(config, unet_stage.CONFIG), resume=resume, progress=False, log=lambda *a: None)


@needs_mpi
def test_unet_stage_on_two_ranks_equals_one_process(frozen, tmp_path):
    _assert_n_ranks_match_one("unet", tmp_path, _unet_sections(frozen), "unet")
    assert os.path.isfile(tmp_path / "two" / "model" / "model_index.json")


#: the CuPy backend on the CuPy stand-in, which says this host has 2 GPUs (one per rank)
STANDIN = {"NPDIFFUSION_BACKEND": "cupy", "NPDIFFUSION_CUPY_STANDIN": "1", "NPDIFFUSION_CUPY_STANDIN_DEVICES": "2"}


@needs_mpi
@pytest.mark.parametrize("stage", ["unet", "clip"])
def test_stage_on_two_ranks_over_nccl_on_the_cupy_standin_equals_one_process(frozen, tmp_path, stage):
    """The CuPy backend under mpiexec -n 2 averages (and CLIP all-gathers) through the NCCL
    communicator (device buffers, cupy.cuda.nccl; here the stand-in's, which carries NCCL's calls over
    MPI) and ends where one process on the same backend ends."""
    sections = {"unet": _unet_sections, "clip": _clip_sections}[stage](frozen, steps=10, checkpointing_steps=10)
    one = _write_config(tmp_path / "one.toml", tmp_path / "one", sections)
    two = _write_config(tmp_path / "two.toml", tmp_path / "two", sections)
    for n, config in ((0, one), (2, two)):
        run = _mpirun(n, "train", stage, "--config", config, "--no-progress", cwd=tmp_path, env=STANDIN)
        assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr.count("of 2 is pid") == 2 and run.stderr.count("collectives over NCCL") == 2, run.stderr
    for sub in (f"checkpoint-10/{stage}", stage):
        err = _max_relative(load_weights(tmp_path / "two" / sub), load_weights(tmp_path / "one" / sub))
        assert err < 1e-9, (sub, err)
    a = read_history_csv(str(tmp_path / "two" / "losses.csv"))
    b = read_history_csv(str(tmp_path / "one" / "losses.csv"))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-9)


NCCL_STANDIN_SCRIPT = """
import os, numpy, pytest
from npdiffusion.backend import set_backend, to_numpy, xp
set_backend("cupy")
import cupy
from cupy.cuda import nccl
from npdiffusion.distributed import get_communicator
comm = get_communicator()
r = comm.rank
a = xp.arange(5, dtype=xp.float32) * (r + 1)
comm.allreduce_sum_(a)
assert to_numpy(a).tolist() == [0, 3, 6, 9, 12]
g = comm.allgather(xp.full((2, 3), float(r)))
assert to_numpy(g).tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
b = xp.full(4, 10.0 + r)
comm.broadcast_(b, 1)
assert to_numpy(b).tolist() == [11.0] * 4
with pytest.raises(TypeError, match="must be a C-contiguous CuPy array"):
    comm.allreduce_sum_(numpy.zeros(3))
host = numpy.zeros(3)                      # a host pointer handed to NCCL itself
with pytest.raises(ValueError, match="is not device memory"):
    comm.comm.allReduce(host.ctypes.data, host.ctypes.data, 3, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, 0)
with pytest.raises(nccl.NcclError, match="different unique ids"):
    nccl.NcclCommunicator(2, nccl.get_unique_id(), r)      # each rank its own id
# the trainer's calls: no host synchronization (the stand-in counts them), the mean of the ranks
from npdiffusion.cupy_standin import count_syncs
from npdiffusion.nn.linear import Linear
lin = Linear(3, 2)
lin(xp.ones((4, 3)) * (r + 1))
lin.backward(xp.ones((4, 2)))
with count_syncs() as log:
    comm.broadcast_parameters(lin)
    metrics = comm.average_gradients(lin, {"loss": xp.asarray(1.0 + r), "other": 2.0})
assert log.total == 0, log.report()
assert to_numpy(dict(lin.named_grads())["weight"]).tolist() == [[6.0] * 3] * 2      # (4 + 8) / 2
assert float(metrics["loss"]) == 1.5 and float(metrics["other"]) == 2.0
from npdiffusion.nn.flat_parameters import flatten_parameters
flatten_parameters(lin)                    # the trainer's flat storage: its gradient buffer reduced in place
lin.zero_grad()
lin(xp.ones((4, 3)) * (r + 1))
lin.backward(xp.ones((4, 2)))
with count_syncs() as log:
    comm.average_gradients(lin, {"loss": 1.0})
assert log.total == 0, log.report()
assert to_numpy(dict(lin.named_grads())["weight"]).tolist() == [[6.0] * 3] * 2
comm.barrier()
os.write(1, f"rank {r} ok\\n".encode())   # one write: the two ranks share the pipe (print's pieces interleave)
"""


@needs_mpi
def test_nccl_communicator_on_the_cupy_standin():
    """Sum, all-gather and broadcast of device arrays between 2 ranks through cupy.cuda.nccl (the
    stand-in's, over MPI); host arrays refused by the communicator, a host pointer by NCCL, and
    ranks that did not share rank 0's unique id by NcclCommunicator; the trainer's parameter
    broadcast and gradient average (per parameter and in flat storage) without a host synchronization."""
    env = {**os.environ, **STANDIN, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", NCCL_STANDIN_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout, run.stdout + run.stderr


ENCODE_SCRIPT = """
import os, numpy
from npdiffusion.data.dataset import ArrayDataset
from npdiffusion.distributed import SingleProcess, get_communicator
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.training import unet_stage
comm = get_communicator()
rng = numpy.random.default_rng(0)
stage = unet_stage.UNetStage.__new__(unet_stage.UNetStage)
stage.dtype = numpy.dtype("float32")
stage.vae = AutoencoderKL(block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=2, norm_num_groups=2)
stage.text_encoder = CLIPTextModel(vocab_size=50, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                   num_hidden_layers=1, max_position_embeddings=6)
stage.tokenizer = lambda texts: numpy.asarray([[ord(c) % 50 for c in t.ljust(6)[:6]] for t in texts])
for model in (stage.vae, stage.text_encoder):
    for _, p in model.named_parameters():                  # the same weights on every rank
        p[...] = rng.standard_normal(p.shape) * 0.3
    model.eval()
unet_stage.ENCODE_BATCH = 16                               # 50 images: chunks of 16, 16, 16, 2 -> 32 + 18 rows
data = ArrayDataset(rng.integers(0, 256, (50, 8, 8, 3), dtype=numpy.uint8), ["c"] * 50)
captions = [f"caption {i}" for i in range(40)]
rows = []
encode = stage.vae.encode
stage.vae.encode = lambda x: rows.append(len(x)) or encode(x)
shared = (*stage.encode_images(data), stage.encode_text(captions))    # over get_communicator(): 2 ranks
assert sum(rows) == (32 if comm.rank == 0 else 18) and comm.size == 2, (rows, comm.size)
stage.comm = SingleProcess()
alone = (*stage.encode_images(data), stage.encode_text(captions))
assert [a.shape for a in shared] == [(50, 2, 4, 4), (50, 2, 4, 4), (40, 6, 8)], [a.shape for a in shared]
assert all(a.dtype == numpy.float32 and a.tobytes() == b.tobytes() for a, b in zip(shared, alone))
os.write(1, f"rank {comm.rank} ok\\n".encode())
"""


@needs_mpi
def test_frozen_encodings_shared_over_two_ranks_equal_one_process():
    """The U-Net stage's VAE posteriors and caption contexts, encoded in chunks dealt out over 2 ranks
    and all-gathered (distributed/chunks.py), equal one process's bit for bit, each rank having
    encoded only its share (32 and 18 of 50 images)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NPDIFFUSION_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", ENCODE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "rank 0 ok" in run.stdout and "rank 1 ok" in run.stdout, run.stdout + run.stderr


@needs_mpi
def test_resume_under_a_different_number_of_ranks_equals_the_uninterrupted_run(frozen, tmp_path):
    """The saved state does not depend on N: 2 ranks x 15 steps resumed as one process to 30, and one
    process's checkpoint-15 resumed under mpiexec -n 2 to 30, both end where one uninterrupted
    one-process run of 30 steps ends (float64, 1e-9 relative), with its 30 losses."""
    sections = _unet_sections(frozen, checkpointing_steps=15)
    one = _write_config(tmp_path / "one.toml", tmp_path / "one", sections)
    _train_unet_here(one)                                               # the uninterrupted reference

    # 2 ranks x 15 steps, then one process from checkpoint-15 to 30
    half = _write_config(tmp_path / "half.toml", tmp_path / "two_one", _unet_sections(frozen, steps=15,
                                                                                      checkpointing_steps=15))
    run = _mpirun(2, "train", "unet", "--config", half, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    _train_unet_here(_write_config(tmp_path / "two_one.toml", tmp_path / "two_one", sections), resume=True)

    # one process's checkpoint-15 (copied alone into a fresh folder), resumed by 2 ranks to 30
    (tmp_path / "one_two").mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-15", tmp_path / "one_two" / "checkpoint-15")
    two = _write_config(tmp_path / "one_two.toml", tmp_path / "one_two", sections)
    run = _mpirun(2, "train", "unet", "--config", two, "--resume", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resumed from" in run.stdout and run.stdout.count("unet: 30 steps") == 1, run.stdout

    want = read_history_csv(str(tmp_path / "one" / "losses.csv"))
    for name in ("two_one", "one_two"):
        for sub in ("checkpoint-30/unet", "unet"):                      # the raw weights, then the EMA export
            err = _max_relative(load_weights(tmp_path / name / sub), load_weights(tmp_path / "one" / sub))
            assert err < 1e-9, (name, sub, err)
        got = read_history_csv(str(tmp_path / name / "losses.csv"))
        assert len(got) == 30, name
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-9)


def _clip_sections(root, **train):
    """The tiny CLIP at learning rate 1e-3: at TRAIN's 3e-3 its loss jumps from 3.3 to 4.9 at step 2, a
    regime that amplifies float32 rounding (2 ranks vs one process: 1.2e-4 relative at step 30 on
    baseline kernels, against 5e-7 at 1e-3), which would test the dynamics, not the gradient."""
    return {"data": _data(), "train": {**TRAIN, "learning_rate": 1e-3, **train},
            "clip": {"tokenizer": str(root / "tok" / "tokenizer"), "text_hidden_size": 16, "text_layers": 1,
                     "text_heads": 2, "text_intermediate_size": 32, "vision_hidden_size": 16, "vision_layers": 1,
                     "vision_heads": 2, "vision_intermediate_size": 32, "patch_size": 8, "projection_dim": 16}}


@needs_mpi
def test_clip_stage_on_two_ranks_equals_one_process(frozen, tmp_path):
    """CLIP's loss couples every pair of the batch: the 2 ranks all-gather the embeddings and take
    the loss over the global batch (distributed/global_contrastive.py), so they end where one process
    ends; the text encoder the U-Net stage reads too."""
    _assert_n_ranks_match_one("clip", tmp_path, _clip_sections(frozen), "clip")
    err = _max_relative(load_weights(tmp_path / "two" / "text_encoder"), load_weights(tmp_path / "one" / "text_encoder"))
    assert err < 1e-9, err


@needs_mpi
def test_tokenizer_stage_on_two_ranks_writes_what_one_process_writes(tmp_path):
    sections = {"data": _data(), "tokenizer": {"model_max_length": 12}}
    one = _write_config(tmp_path / "one.toml", tmp_path / "one", sections)
    two = _write_config(tmp_path / "two.toml", tmp_path / "two", sections)
    tokenizer_stage.train(load_config(one, tokenizer_stage.CONFIG))
    run = _mpirun(2, "train", "tokenizer", "--config", two, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("tokenizer: ") == 1, run.stdout                 # rank 0 alone reports
    names = sorted(os.listdir(tmp_path / "one" / "tokenizer"))
    assert names == sorted(os.listdir(tmp_path / "two" / "tokenizer")) and "merges.txt" in names
    for name in names:
        assert (tmp_path / "two" / "tokenizer" / name).read_bytes() == (tmp_path / "one" / "tokenizer" / name).read_bytes()


@needs_mpi
@pytest.mark.parametrize("stage", ["clip", "unet", "vae"])
def test_float32_loss_curves_of_two_ranks_and_one_process_agree(frozen, tmp_path, stage):
    """The issue's float32 criterion: 30 steps, loss curves within 1e-4 relative."""
    sections = {"clip": _clip_sections, "unet": _unet_sections}.get(stage, lambda root, **train: {
        "data": _data(), "train": {**TRAIN, **train},
        "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2}})(frozen, dtype="float32")
    _train_one_process_and_two_ranks(stage, tmp_path, sections)
    a = read_history_csv(str(tmp_path / "two" / "losses.csv"))
    b = read_history_csv(str(tmp_path / "one" / "losses.csv"))
    assert len(a) == len(b) == 30
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)
    assert {w.dtype for w in load_weights(tmp_path / "two" / stage).values()} == {np.dtype(np.float32)}


def _rank_pids(pid):
    """{rank: pid} of the processes under ``pid`` (mpiexec -> hydra_pmi_proxy -> ranks), read from
    each process's PMI_RANK."""
    found = {}
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for kid in map(int, kids):
        try:
            with open(f"/proc/{kid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            found[int(env[b"PMI_RANK"])] = kid
        else:
            found.update(_rank_pids(kid))
    return found


@needs_mpi
@pytest.mark.skipif(shutil.which("pgrep") is None or not os.path.isdir("/proc"), reason="needs pgrep and /proc")
def test_a_killed_rank_stops_the_run_naming_it_and_the_run_resumes(frozen, tmp_path):
    """SIGKILL rank 1 after the first checkpoint: the run exits non-zero within 60 s, the launcher's
    message names the dead PID and our start-up line maps that PID to rank 1; the last checkpoint loads,
    and ``mpiexec -n 2 ... --resume`` ends bitwise where an uninterrupted 2-rank run ends."""
    long = _write_config(tmp_path / "long.toml", tmp_path / "killed",
                         _unet_sections(frozen, steps=2000, checkpointing_steps=5))
    env = {**os.environ, "NPDIFFUSION_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "npdiffusion", "train", "unet",
                             "--config", long, "--no-progress"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "killed" / "checkpoint-5").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-5"
            time.sleep(0.02)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert f"npdiffusion: MPI rank 1 of 2 is pid {ranks[1]}" in err, err
    assert f"PID {ranks[1]}" in out + err and "Killed" in out + err, out + err   # MPICH's report
    # the last checkpoint is intact (loads) and before step 30
    from npdiffusion.training.checkpoint import CheckpointManager
    last = CheckpointManager(str(tmp_path / "killed")).latest()
    step = int(last.rsplit("-", 1)[1])
    assert 5 <= step < 30, last
    assert load_weights(os.path.join(last, "unet"))

    sections = _unet_sections(frozen, checkpointing_steps=5)
    resumed = _write_config(tmp_path / "resume.toml", tmp_path / "killed", sections)
    run = _mpirun(2, "train", "unet", "--config", resumed, "--resume", "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"resumed from {last}" in run.stdout, run.stdout
    whole = _write_config(tmp_path / "whole.toml", tmp_path / "whole", sections)
    run = _mpirun(2, "train", "unet", "--config", whole, "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    for sub in ("checkpoint-30/unet", "unet"):
        a, b = load_weights(tmp_path / "killed" / sub), load_weights(tmp_path / "whole" / sub)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), sub     # bitwise
