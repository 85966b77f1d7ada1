"""The generic training loop: exact resume (in-process and after SIGKILL), non-finite steps skipped and
counted, a run of bad steps stopping with the last good checkpoint intact, loss history, EMA export.

The stage under test (``ToyStage``) is a small conv net built from npdiffusion.nn layers (Conv2d, SiLU,
Dropout, Linear) that regresses each image's mean colour plus noise drawn from the trainer's generator,
so every piece of state that resume must restore is exercised: parameters, AdamW moments, a cosine
schedule, EMA, the data order, the trainer's RNG and Dropout's own generator.
Run as a script (``python tests/test_training_loop.py run OUT STEPS``) it is the subprocess the kill test
SIGKILLs.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.data.shapes import make_shapes
from npdiffusion.io.pretrained import load_weights, save_weights, write_config
from npdiffusion.io.safetensors import load_file
from npdiffusion.nn.activations import SiLU
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.random import manual_seed
from npdiffusion.training.checkpoint import STATE_FILE
from npdiffusion.training.config import TrainConfig
from npdiffusion.training.loop import Stage, Trainer, TrainingError, read_history_csv

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


class ToyNet(Module):
    """x (B, 3, S, S) -> conv 3->4 -> SiLU -> spatial mean (B, 4) -> Dropout -> Linear 4->3."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2d(3, 4, 3, padding=1)
        self.act = SiLU()
        self.drop = Dropout(0.2)
        self.head = Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv(x))                                   # (B, 4, S, S)
        self._hw = h.shape[2] * h.shape[3]
        self._hshape = h.shape
        return self.head(self.drop(h.mean(axis=(2, 3))))            # (B, 3)

    def backward(self, dy):
        dpool = self.drop.backward(self.head.backward(dy))           # (B, 4)
        dh = xp.broadcast_to((dpool / self._hw)[:, :, None, None], self._hshape)
        return self.conv.backward(self.act.backward(xp.ascontiguousarray(dh)))


class ToyStage(Stage):
    """Regress the mean colour of each image (+ noise from the trainer's rng); MSE loss."""

    name = "toy"

    def __init__(self, seed=0, bad_calls=(), dtype="float64", sleep=0.0):
        manual_seed(seed)
        self.module = ToyNet().to(dtype)
        self.dtype = dtype
        self.bad_calls = set(bad_calls)      # train_step calls (1-based) that get an inf gradient
        self.calls = 0
        self.sleep = sleep

    def train_step(self, batch, rng):
        self.calls += 1
        x = asarray(batch.images.astype(self.dtype))
        target = batch.images.mean(axis=(2, 3)) + 0.05 * rng.standard_normal((x.shape[0], 3))
        pred = self.module(x)
        diff = pred - asarray(target.astype(self.dtype))
        loss = float((diff * diff).mean())
        self.module.backward(diff * (2.0 / diff.size))
        if self.calls in self.bad_calls:
            self.module.head._grads["weight"][0, 0] = np.inf
        if self.sleep:
            time.sleep(self.sleep)
        return {"loss": loss, "abs_err": float(np.abs(to_numpy(diff)).mean())}

    def save_models(self, folder):
        sub = os.path.join(folder, "toy")
        write_config(sub, {"kind": "ToyNet"}, "ToyNet")
        save_weights(sub, self.module.state_dict())

    def load_models(self, folder):
        self.module.load_state_dict(load_weights(os.path.join(folder, "toy")))

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def toy_config(**overrides):
    base = dict(steps=12, batch_size=8, learning_rate=3e-2, lr_scheduler="cosine", lr_warmup_steps=2,
                use_ema=True, ema_decay=0.9, checkpointing_steps=4, checkpoints_total_limit=2, max_grad_norm=1.0,
                seed=3, dtype="float64", prefetch=2)
    base.update(overrides)
    return TrainConfig(**base)


def dataset():
    return make_shapes(60, seed=5, size=8)   # 60 images, 7 batches per epoch: epochs roll over


def params(module):
    return {k: to_numpy(v).copy() for k, v in module.named_parameters()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def run_toy(out, steps, resume=False, **kw):
    stage = ToyStage(seed=3, sleep=kw.pop("sleep", 0.0), bad_calls=kw.pop("bad_calls", ()))
    trainer = Trainer(stage, dataset(), toy_config(steps=steps, **kw), out, resume=resume, progress=False,
                      log=lambda *_: None)
    return stage, trainer, trainer.fit()


# ------------------------------------------------------------------------------ exact resume
class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_equals_uninterrupted_run_bitwise(tmp_path):
    ref_stage, ref_trainer, ref = run_toy(str(tmp_path / "ref"), 18)

    stage = ToyStage(seed=3)
    original = stage.train_step

    def dying(batch, rng):                       # dies inside step 11, after checkpoint-8
        if stage.calls == 10:
            raise Interrupt
        return original(batch, rng)

    stage.train_step = dying
    trainer = Trainer(stage, dataset(), toy_config(steps=18), str(tmp_path / "run"), progress=False)
    with pytest.raises(Interrupt):
        trainer.fit()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-4", "checkpoint-8", "latest", "losses.csv"]

    stage2, trainer2, result = run_toy(str(tmp_path / "run"), 18, resume=True)
    assert trainer2.resume_from.endswith("checkpoint-8") and result.steps == 18
    assert_bitwise_equal(params(stage2.module), params(ref_stage.module))
    for slot in ("exp_avg", "exp_avg_sq"):
        assert_bitwise_equal({k: to_numpy(v) for k, v in trainer2.optimizer.state[slot].items()},
                             {k: to_numpy(v) for k, v in ref_trainer.optimizer.state[slot].items()})
    assert_bitwise_equal({k: to_numpy(v) for k, v in trainer2.ema.shadow.items()},
                         {k: to_numpy(v) for k, v in ref_trainer.ema.shadow.items()})
    assert trainer2.rng.bit_generator.state == ref_trainer.rng.bit_generator.state
    assert stage2.module.drop.rng.bit_generator.state == ref_stage.module.drop.rng.bit_generator.state
    assert trainer2.optimizer.lr == ref_trainer.optimizer.lr
    assert (tmp_path / "run" / "losses.csv").read_text() == (tmp_path / "ref" / "losses.csv").read_text()
    # keep-last-2: checkpoints 12 and 16 deleted only after newer ones were complete; 18 is the final one
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tmp_path / "ref"))
    assert sorted(p for p in os.listdir(tmp_path / "ref") if p.startswith("checkpoint")) == \
        ["checkpoint-16", "checkpoint-18"]


def test_final_export_holds_the_ema_weights_and_checkpoints_hold_the_training_weights(tmp_path):
    stage, trainer, _ = run_toy(str(tmp_path), 8)
    exported = load_weights(tmp_path / "toy")
    assert_bitwise_equal(exported, {k: to_numpy(v) for k, v in trainer.ema.shadow.items()})
    in_ckpt = load_weights(tmp_path / "checkpoint-8" / "toy")
    assert_bitwise_equal(in_ckpt, params(stage.module))
    assert not all(np.array_equal(exported[k], in_ckpt[k]) for k in exported)
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert config["_class_name"] == "ToyNet"
    assert (tmp_path / "losses.png").read_bytes().startswith(b"\x89PNG")


def test_loss_history_csv_reads_back_exactly_and_lists_extra_metrics(tmp_path):
    _, trainer, result = run_toy(str(tmp_path), 8)
    rows = read_history_csv(str(tmp_path / "losses.csv"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows == trainer.history
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "skipped", "abs_err"}
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1.5e-2)    # warm-up over 2 steps
    assert result.first_loss == rows[0]["loss"] and result.skipped_steps == 0


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    run_toy(str(tmp_path), 4)
    before = {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)}
    with pytest.raises(TrainingError, match="already holds checkpoints .*checkpoint-4.*--resume"):
        run_toy(str(tmp_path), 8)
    assert {p: os.path.getmtime(tmp_path / p) for p in os.listdir(tmp_path)} == before


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path):
    notes = []
    stage = ToyStage(seed=3)
    trainer = Trainer(stage, dataset(), toy_config(steps=4), str(tmp_path), resume=True, progress=False,
                      log=notes.append)
    assert trainer.resume_from is None and "starting a new run" in notes[0]
    assert trainer.fit().steps == 4


# ------------------------------------------------------------------------------ non-finite steps
def test_injected_inf_gradient_skips_the_step_bitwise_and_counts_it(tmp_path):
    stage = ToyStage(seed=3, bad_calls={3})
    trainer = Trainer(stage, dataset(), toy_config(steps=5, checkpointing_steps=100), str(tmp_path),
                      progress=False)
    snapshots = []
    original = trainer._one_step

    def spy():
        before = (params(stage.module), {k: to_numpy(v).copy() for k, v in trainer.ema.shadow.items()},
                  trainer.optimizer.step_count, trainer.optimizer.lr)
        row = original()
        snapshots.append((before, row))
        return row

    trainer._one_step = spy
    result = trainer.fit()
    (p_before, ema_before, opt_steps, lr), row = snapshots[2]
    _, next_row = snapshots[3]
    assert row["skipped"] == 1 and math.isinf(row["grad_norm"]) and math.isfinite(row["loss"])
    p_after, ema_after = snapshots[3][0][0], snapshots[3][0][1]
    assert_bitwise_equal(p_after, p_before)                 # parameters untouched ...
    assert_bitwise_equal(ema_after, ema_before)             # ... EMA too ...
    assert snapshots[3][0][2] == opt_steps                   # ... no optimizer step ...
    assert snapshots[3][0][3] == lr                          # ... and the schedule did not advance
    assert next_row["skipped"] == 0
    assert result.skipped_steps == 1 and trainer.optimizer.step_count == 4 and trainer.bad_run == 0
    assert [r["skipped"] for r in read_history_csv(str(tmp_path / "losses.csv"))] == [0, 0, 1, 0, 0]


def test_nan_loss_is_skipped_too(tmp_path):
    stage = ToyStage(seed=3)
    original = stage.train_step

    def nan_at_2(batch, rng):
        out = original(batch, rng)
        return {**out, "loss": math.nan} if stage.calls == 2 else out

    stage.train_step = nan_at_2
    trainer = Trainer(stage, dataset(), toy_config(steps=3), str(tmp_path), progress=False)
    assert trainer.fit().skipped_steps == 1
    assert math.isnan(trainer.history[1]["loss"]) and math.isnan(trainer.history[1]["grad_norm"])


def test_consecutive_bad_steps_stop_with_a_clear_message_and_the_last_good_checkpoint_intact(tmp_path):
    stage = ToyStage(seed=3, bad_calls=set(range(7, 100)))
    trainer = Trainer(stage, dataset(), toy_config(steps=30, max_consecutive_bad_steps=3), str(tmp_path),
                      progress=False)
    good = {}
    original_save = trainer.save_checkpoint

    def save_and_remember():
        good[trainer.step] = params(stage.module)
        return original_save()

    trainer.save_checkpoint = save_and_remember
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert "stopped at step 9: 3 consecutive steps had a non-finite loss or gradient" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-4'}" in message
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-4"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-4"
    assert_bitwise_equal(load_weights(tmp_path / "checkpoint-4" / "toy"), good[4])
    # the parameters in memory are those of step 6, the last good step: 7, 8, 9 changed nothing
    assert trainer.skipped_steps == 3


# ------------------------------------------------------------------------------ killed mid-run
def _script_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.pop("NPDIFFUSION_BACKEND", None)
    return env


def _run_script(out, steps, resume=False, sleep=0.0):
    args = [sys.executable, HERE, "run", out, str(steps), "resume" if resume else "fresh", str(sleep)]
    return subprocess.Popen(args, env=_script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_every_checkpoint_complete(out):
    names = os.listdir(out)
    for name in names:
        if name.startswith("checkpoint-"):
            folder = os.path.join(out, name)
            assert os.path.isfile(os.path.join(folder, STATE_FILE)), name
            for f in ("optimizer.safetensors", "lr_scheduler.safetensors", "ema.safetensors",
                      "data_order.safetensors", os.path.join("toy", "diffusion_pytorch_model.safetensors")):
                load_file(os.path.join(folder, f))          # complete and valid, or this raises
    latest = open(os.path.join(out, "latest")).read().strip()
    assert latest in names


def test_run_killed_mid_run_and_resumed_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 60
    ref = _run_script(str(tmp_path / "ref"), steps)
    assert ref.wait(timeout=120) == 0, ref.stderr.read()
    reference = load_weights(tmp_path / "ref" / "toy")
    rng = np.random.default_rng()
    for trial in range(2):
        out = str(tmp_path / f"killed{trial}")
        proc = _run_script(out, steps, sleep=0.01)
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(out, "latest")):      # wait for the first checkpoint
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))                            # then kill at a random moment
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
        _assert_every_checkpoint_complete(out)
        resumed = _run_script(out, steps, resume=True)
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
        assert not [p for p in os.listdir(out) if p.endswith(".tmp")]     # stale temp folders removed
        assert_bitwise_equal(load_weights(os.path.join(out, "toy")), reference)
        assert open(os.path.join(out, "losses.csv")).read() == open(tmp_path / "ref" / "losses.csv").read()


if __name__ == "__main__":      # the subprocess of the kill test
    _, command, out_dir, n_steps, mode, pause = sys.argv
    assert command == "run"
    _, _, res = run_toy(out_dir, int(n_steps), resume=mode == "resume", sleep=float(pause),
                        checkpointing_steps=10, checkpoints_total_limit=2)
    print(res.summary("toy"))
