"""The generic, resumable training loop that every model stage (CLIP, VAE, U-Net) plugs into.

A ``Stage`` owns the trained ``module`` and turns a batch into a loss, running the module's
hand-written backward so that its parameter gradients are filled. The ``Trainer`` does the rest::

    for step in 1..steps:
        batch = next(loader)                        # prepared by the prefetch thread
        module.zero_grad()
        metrics = stage.train_step(batch, rng)      # forward + backward; metrics["loss"]
        norm = ||grads||; loss, metrics, norm read to the host at once   (one device sync)
        if loss and norm finite: clip the gradients to max_grad_norm     (when > 0)
        if loss or norm not finite:                 # SKIP: no optimizer, EMA or schedule step,
            skipped += 1; bad_run += 1              #   so the parameters stay bitwise unchanged
            bad_run == max_consecutive_bad_steps -> stop: TrainingError, last good checkpoint intact
        else:
            optimizer.step(); lr_scheduler.step(); ema.update(); stage.after_step(); bad_run = 0
        every checkpointing_steps (and at the end): a checkpoint (checkpoint.py); one that falls on a
        skipped step is taken after the next applied step instead

With ``train.mixed_precision = "fp16"`` the module computes in float16 and the optimizer, the EMA and
the gradient clipping work on float32 masters (``MasterWeights``); a ``DynamicLossScaler`` sets
``stage.loss_scale`` = S before each step (the stage hands S * dL/dout, computed in float32 and cast
to float16 once, to the module's backward), then ``unscale_`` loads the float32 master gradients
divided by S and checks them (one host synchronization). A step with a non-finite gradient and a
finite loss is an overflow: skipped (masters, module and moments bitwise unchanged), S halved,
counted in ``skipped``; ``max_consecutive_overflow_steps`` of them in a row stop the run with a
``TrainingError``. Checkpoints hold the float32 masters in the stage's model folders (the module is
put in float32 while they are written and read) and the scaler's state in trainer_state.json, so a
resumed fp16 run is bitwise the uninterrupted one.

``rng`` is the trainer's NumPy generator (PCG64); every random draw of a step (noise, timesteps,
caption dropout, posterior samples) must come from it, in the main thread, so that its state,
saved in each checkpoint, makes the resumed run draw the same numbers. Dropout modules' own
generators inside ``module`` are saved too. A run killed and resumed from a checkpoint ends with
parameters bitwise identical to an uninterrupted run (on the CPU; tested).

The loss history (one row per step: step, loss, lr, grad_norm, skipped, and the stage's extra
metrics) is kept in memory, written to ``losses.csv`` in each checkpoint and in the output folder,
and drawn to ``losses.png`` at the end. Docs: docs/training.md.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import contextlib
from dataclasses import dataclass

import numpy

from npdiffusion.backend import to_host_floats
from npdiffusion.data.loader import DataLoader
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.pretrained import check_finite
from npdiffusion.io.safetensors import load_with_metadata, save_file
from npdiffusion.nn.flat_parameters import flatten_parameters
from npdiffusion.optim.adamw import AdamW
from npdiffusion.optim.clip_grad import clip_grads_with_norm_, grad_norm_array
from npdiffusion.optim.ema import EMA
from npdiffusion.optim.lr_schedule import get_scheduler
from npdiffusion.optim.mixed_precision import DynamicLossScaler, MasterWeights, NonFiniteGradientError
from npdiffusion.optim.optimizer import load_state, save_state
from npdiffusion.training.checkpoint import CheckpointManager
from npdiffusion.training.config import TrainConfig

CHECKPOINT_FORMAT = 1
LOADER_METADATA_KEY = "npdiffusion.loader"
BASE_COLUMNS = ("step", "loss", "lr", "grad_norm", "skipped")


class TrainingError(Exception):
    """Training cannot go on (diverged, a checkpoint clash): one clear message, checkpoints intact."""


class Stage:
    """What a model stage provides to the ``Trainer`` (subclass it, or duck-type the same names).

    * ``name``: shown on the progress bar and in messages (``"vae"``).
    * ``module``: the ``Module`` being trained (the optimizer's target); frozen models live elsewhere.
    * ``train_step(batch, rng) -> dict``: forward, loss and backward into ``module``'s gradients (the
      trainer has zeroed them); returns ``{"loss": float, ...extra float metrics}`` (a bare float is
      taken as the loss). Draw randomness only from ``rng``.
    * ``save_models(folder)``: write the trained model(s) into ``folder`` in the diffusers layout
      (e.g. ``folder/vae/config.json`` + ``diffusion_pytorch_model.safetensors``).
    * ``load_models(folder)``: load what ``save_models`` wrote back into ``module``, exactly.
    * ``supports_mixed_precision``: True when ``train_step`` honours ``loss_scale`` (below) and casts
      its inputs to ``module.dtype``; ``train.mixed_precision = "fp16"`` is refused otherwise.
    * ``loss_scale``: set by the trainer before each ``train_step`` under fp16 (1.0 otherwise): the
      stage must hand ``loss_scale * dL/dout`` to the module's backward, multiplied in float32 before
      the one cast to the module's float16 (``simple_loss(..., grad_scale=)``), and report the
      unscaled loss. ``master_weights``: the trainer's ``MasterWeights`` under fp16 (else None), for an
      ``after_step`` that edits parameters (it must edit the float32 masters too).
    * optional: ``collate`` (runs in the prefetch thread, see ``DataLoader``), ``after_step()`` (after
      each applied optimizer step), ``export_models(folder)`` (the final models, with the weights to
      export in place; default ``save_models``: a stage may measure something first, like the VAE's
      scaling factor, or write extra folders), ``state_dict()`` / ``load_state_dict(d)`` (JSON-able
      extra state), ``lr_ratios`` ({parameter name prefix: r}: those parameters learn at r times the
      learning rate; AdamW's ``lr_ratios``). ``comm``: set by the trainer, the run's ``Communicator``
      (for a loss that couples the samples of the global batch, as CLIP's does).
    """

    name = "stage"
    module = None
    collate = None
    supports_mixed_precision = False
    loss_scale = 1.0
    master_weights = None
    comm = None

    def train_step(self, batch, rng):
        raise NotImplementedError

    def save_models(self, folder):
        raise NotImplementedError

    def load_models(self, folder):
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def export_models(self, folder):
        self.save_models(folder)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    """Summary of a finished ``Trainer.fit``."""

    steps: int
    skipped_steps: int
    first_loss: float
    last_loss: float
    seconds: float
    checkpoint: str | None
    resumed_from: str | None

    def summary(self, name: str) -> str:
        text = (f"{name}: {self.steps} steps, loss {self.first_loss:.4g} -> {self.last_loss:.4g}, "
                f"{self.skipped_steps} skipped, {self.seconds:.1f} s")
        if self.resumed_from:
            text += f" (resumed from {self.resumed_from})"
        return text


def trainer_rng(seed: int) -> numpy.random.Generator:
    """The trainer's generator for ``seed``: a stream of its own (not the init's, not the loader's)."""
    return numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(1,)))


def check_mixed_precision(config: TrainConfig, stage=None) -> None:
    """A clear ValueError when ``train.mixed_precision`` cannot be used with ``train.dtype`` or ``stage``."""
    mode = config.mixed_precision
    if mode not in ("no", "fp16"):
        raise ValueError(f"train.mixed_precision must be 'no' or 'fp16', got {mode!r}")
    if mode == "no":
        return
    if config.dtype != "float32":
        raise ValueError(f"train.mixed_precision = 'fp16' keeps float32 master weights and needs train.dtype = "
                         f"'float32', got {config.dtype!r}")
    if stage is not None and not getattr(stage, "supports_mixed_precision", False):
        raise ValueError(f"train.mixed_precision = 'fp16': the {getattr(stage, 'name', 'stage')!r} stage does not "
                         "support it (its train_step must honour Stage.loss_scale); use mixed_precision = 'no'")


def module_generators(module) -> dict:
    """``{module path: numpy Generator}`` for every sub-module holding an ``rng`` (Dropout)."""
    out = {}
    for name, m in module.named_modules():
        rng = m.__dict__.get("rng")
        if isinstance(rng, numpy.random.Generator):
            out[name or "."] = rng
    return out


class Trainer:
    """Runs ``stage`` on ``dataset`` with the ``[train]`` settings ``config`` (a ``TrainConfig``).

    ``output_dir`` receives checkpoints, losses.csv/png and the final models. ``resume=True`` continues
    from the newest checkpoint there (a fresh start when there is none, as diffusers does); without it,
    an output folder that already holds checkpoints is refused, so nothing is overwritten.
    ``progress``: show the tqdm bar (None: only on a terminal). ``log``: where one-line notes go.
    ``config_snapshot``: a JSON-able dict stored in each checkpoint (the stage's full config).
    """

    def __init__(self, stage, dataset, config: TrainConfig, output_dir, *, resume: bool = False,
                 progress: bool | None = None, log=print, config_snapshot: dict | None = None, comm=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: config must be a TrainConfig, got {type(config).__name__}")
        check_mixed_precision(config, stage)
        # Data-parallel (docs/distributed.md): comm is this run's communicator, from
        # distributed.get_communicator() when None (one process unless started by mpiexec -n N).
        # Rank 0 alone shows progress, logs and writes; each rank trains on its shard of the batch.
        from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415

        self.comm = comm if comm is not None else get_communicator()
        if not self.comm.is_root:
            progress, log = False, _quiet
        stage.comm = self.comm
        self.stage = stage
        self.module = stage.module
        self.config = config
        self.log = log
        self.progress = progress
        self.config_snapshot = config_snapshot or {}
        self.checkpoints = CheckpointManager(output_dir, keep_last=config.checkpoints_total_limit)
        self.output_dir = self.checkpoints.output_dir
        self.resume_from = None
        if resume:
            self.resume_from = self.checkpoints.latest()
            if self.resume_from is None:
                log(f"{stage.name}: no checkpoint in {self.output_dir!r} to resume from; starting a new run")
        elif self.checkpoints.checkpoints():
            raise TrainingError(f"output_dir {self.output_dir!r} already holds checkpoints (newest: "
                                f"{os.path.basename(self.checkpoints.latest())}); pass --resume to continue "
                                "that run, or choose another output_dir")
        self.loader = DataLoader(dataset, config.batch_size, seed=config.seed, prefetch=config.prefetch,
                                 collate=getattr(stage, "collate", None),
                                 shard=self.comm.shard(config.batch_size) if self.comm.size > 1 else None)
        self.comm.broadcast_parameters(self.module)                   # before fp16 copies the masters
        self.master = self.scaler = None
        if config.mixed_precision == "fp16":
            self.master = MasterWeights(self.module, "float16")    # float32 copies; the module is now float16
            self.scaler = DynamicLossScaler(init_scale=config.loss_scale_init,
                                            growth_interval=config.loss_scale_growth_interval,
                                            max_consecutive_skips=config.max_consecutive_overflow_steps)
            stage.master_weights = self.master
        # every parameter and gradient a view of one buffer per dtype, so that the per-step work that
        # every rank repeats is a few calls, not a dozen per parameter (docs/optim.md, "Flat training storage")
        flatten_parameters(self.module)
        #: what the optimizer, the EMA and the clipping see: the masters under fp16, else the module
        self.target = self.master if self.master is not None else self.module
        self.optimizer = AdamW(self.target, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               eps=config.adam_epsilon, weight_decay=config.adam_weight_decay,
                               lr_ratios=getattr(stage, "lr_ratios", None))
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, config.lr_warmup_steps, config.steps)
        self.ema = EMA(self.target, decay=config.ema_decay) if config.use_ema else None
        self.rng = trainer_rng(config.seed)
        self.step = 0
        self.skipped_steps = 0
        self.bad_run = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            log(f"{stage.name}: resuming from {self.resume_from} (step {self.step})")

    # ================================================================== the loop
    def fit(self) -> TrainResult:
        """Train up to ``config.steps``; returns a ``TrainResult``. Raises ``TrainingError`` on divergence."""
        from tqdm import tqdm  # noqa: PLC0415

        cfg = self.config
        last_ckpt = self.resume_from
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage.name, unit="step",
                   disable=None if self.progress is None else not self.progress, dynamic_ncols=True)
        started = time.perf_counter() - self.elapsed
        due = False
        try:
            while self.step < cfg.steps:
                row = self._one_step()
                self.history.append(row)
                bar.update(1)
                bar.set_postfix(self._postfix(), refresh=False)
                if self.bad_run >= cfg.max_consecutive_bad_steps:
                    raise TrainingError(self._diverged_message(row))
                # A checkpoint falling on a skipped step waits for the next applied one, so every
                # checkpoint is taken right after a good step (except the final one).
                due = due or self.step % cfg.checkpointing_steps == 0
                if (due and not row["skipped"]) or self.step == cfg.steps:
                    self.elapsed = time.perf_counter() - started
                    last_ckpt = self.save_checkpoint()
                    due = False
        finally:
            bar.close()
            self.loader.close()
        self.elapsed = time.perf_counter() - started
        self.export()
        losses = [r["loss"] for r in self.history if not r["skipped"]]
        tail = losses[-max(1, len(losses) // 20):] if losses else [math.nan]
        return TrainResult(self.step, self.skipped_steps, losses[0] if losses else math.nan,
                           float(numpy.mean(tail)), self.elapsed, last_ckpt, self.resume_from)

    def _one_step(self) -> dict:
        cfg = self.config
        batch = next(self.loader)
        self.target.zero_grad()                     # MasterWeights.zero_grad clears the module's too
        if self.scaler is None:
            metrics = self.stage.train_step(batch, self.rng)
        else:
            self.stage.loss_scale = self.scaler.get_scale()
            # float16 overflow in the backward is expected now and then (S too large): the scaler
            # finds the inf/NaN and skips the step, so NumPy's RuntimeWarnings would be noise
            with numpy.errstate(over="ignore", invalid="ignore"):
                metrics = self.stage.train_step(batch, self.rng)
        if not isinstance(metrics, dict):
            metrics = {"loss": metrics}
        # N ranks: gradients and metrics averaged over the ranks first (docs/distributed.md); one rank: as is
        metrics = self.comm.average_gradients(self.module, metrics)
        if self.scaler is not None:                             # fp16: masters <- float16 grads / S, unread
            self.scaler.unscale_(self.optimizer, check=False)
        # One host read per step (on CuPy, one synchronization): the loss, the stage's metrics and the
        # gradient norm (of the float32 masters under fp16: non-finite exactly when one of them is),
        # measured on the device and copied back together.
        total = grad_norm_array(self.target)
        *values, total = to_host_floats([*metrics.values(), 0.0 if total is None else total])
        metrics = dict(zip(metrics, values))
        loss = metrics.pop("loss")
        lr = float(self.optimizer.lr)
        norm = math.nan
        ok = math.isfinite(loss)
        overflow = False
        if self.scaler is not None:
            metrics["loss_scale"] = self.scaler.get_scale()
            grads_ok = math.isfinite(total)
            self.scaler.record_finite(grads_ok, self.optimizer)
            overflow = ok and not grads_ok                      # a finite loss: float16 overflow
            ok = ok and grads_ok
        if ok:
            norm = total
            ok = math.isfinite(norm)
            if ok and cfg.max_grad_norm > 0:
                clip_grads_with_norm_(self.target, cfg.max_grad_norm, norm)
        self.step += 1
        if ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)                # AdamW on the masters, then masters -> module
            else:
                self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.stage.after_step()
            self.bad_run = 0
        else:
            self.skipped_steps += 1
            if not overflow:                                    # overflows are bounded by the scaler
                self.bad_run += 1
        if self.scaler is not None:
            try:
                self.scaler.update()                            # halve S after an overflow, else maybe grow
            except NonFiniteGradientError as exc:
                raise TrainingError(self._overflow_message(exc)) from None
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "skipped": int(not ok), **metrics}

    def _overflow_message(self, exc) -> str:
        good = self.checkpoints.latest()
        where = f"the last good checkpoint is {good}" if good else "no checkpoint had been written yet"
        return (f"{self.stage.name}: stopped at step {self.step}: {self.scaler.consecutive_skips} consecutive fp16 "
                f"steps had non-finite gradients (train.max_consecutive_overflow_steps = "
                f"{self.config.max_consecutive_overflow_steps}), each skipped; {where}. {exc}")

    @contextlib.contextmanager
    def _module_holds_masters(self):
        """Under fp16: the module in float32 holding the masters exactly (to save or load the model
        folders), then back in float16 from the masters. A no-op without mixed precision."""
        if self.master is None:
            yield
            return
        self.module.to("float32")
        self.master.copy_to_module()
        try:
            yield
        finally:
            self.module.to(self.master.compute_dtype)
            self.master.copy_to_module()

    def _postfix(self) -> dict:
        recent = [r["loss"] for r in self.history[-20:] if not r["skipped"]]
        out = {"loss": f"{numpy.mean(recent):.4g}" if recent else "nan"}
        if self.skipped_steps:
            out["skipped"] = self.skipped_steps
        return out

    def _diverged_message(self, row) -> str:
        good = self.checkpoints.latest()
        where = f"the last good checkpoint is {good}" if good else "no checkpoint had been written yet"
        what = f"loss {row['loss']}" if not math.isfinite(row["loss"]) else f"gradient norm {row['grad_norm']}"
        return (f"{self.stage.name}: stopped at step {self.step}: {self.bad_run} consecutive steps had a non-finite "
                f"loss or gradient (last: {what}), each skipped; {where}; lower the learning rate (or "
                f"raise max_consecutive_bad_steps) and resume with --resume")

    # ================================================================== checkpoints
    def _trainer_state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "stage": self.stage.name, "step": self.step,
                "skipped_steps": self.skipped_steps, "consecutive_bad_steps": self.bad_run,
                "rng": self.rng.bit_generator.state,
                "module_rngs": {k: g.bit_generator.state for k, g in module_generators(self.module).items()},
                "stage_state": self.stage.state_dict(), "elapsed_seconds": self.elapsed,
                "config": self.config_snapshot, "mixed_precision": self.config.mixed_precision,
                "loss_scaler": None if self.scaler is None else self.scaler.state_dict()}

    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` (atomically, see checkpoint.py); returns its path."""
        check = dict(self.target.named_parameters())
        try:
            check_finite(check, f"{self.stage.name} parameters at step {self.step}")
        except ValueError as exc:
            good = self.checkpoints.latest()
            raise TrainingError(f"{exc}; not saving them. The last good checkpoint is {good}"
                                if good else f"{exc}; not saving them") from None
        if not self.comm.is_root:  # every rank checked the (identical) parameters; rank 0 writes
            return os.path.join(self.output_dir, f"checkpoint-{self.step}")
        csv_text = self.history_csv()

        def write(folder):
            with self._module_holds_masters():              # fp16: the model folders hold the masters
                self.stage.save_models(folder)
            save_state(os.path.join(folder, "optimizer.safetensors"), self.optimizer.state_dict())
            save_state(os.path.join(folder, "lr_scheduler.safetensors"), self.lr_scheduler.state_dict())
            if self.ema is not None:
                save_state(os.path.join(folder, "ema.safetensors"), self.ema.state_dict())
            loader = self.loader.state_dict()
            order = loader.pop("order")
            save_file({"order": order}, os.path.join(folder, "data_order.safetensors"),
                      metadata={LOADER_METADATA_KEY: json.dumps(loader, sort_keys=True)})
            atomic_write_text(os.path.join(folder, "losses.csv"), csv_text)

        path = self.checkpoints.save(self.step, write, self._trainer_state())
        atomic_write_text(os.path.join(self.output_dir, "losses.csv"), csv_text)
        return path

    def load_checkpoint(self, folder: str) -> None:
        """Restore everything ``save_checkpoint`` wrote (parameters, moments, EMA, schedule, data order,
        RNG states, counters, history)."""
        state = CheckpointManager.read_state(folder)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{folder}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        if state.get("stage") != self.stage.name:
            raise ValueError(f"{folder} is a checkpoint of the {state.get('stage')!r} stage, not {self.stage.name!r}")
        with self._module_holds_masters():
            self.stage.load_models(folder)
            if self.master is not None:                     # the folders hold float32 masters exactly
                self.master.load_state_dict(dict(self.module.named_parameters()))
        if self.scaler is not None:
            if state.get("loss_scaler"):
                self.scaler.load_state_dict(state["loss_scaler"])
            else:
                self.log(f"{self.stage.name}: {folder} was trained without mixed precision; the loss scale "
                         f"starts at {self.scaler.get_scale():g}")
        self.optimizer.load_state_dict(load_state(os.path.join(folder, "optimizer.safetensors")))
        self.lr_scheduler.load_state_dict(load_state(os.path.join(folder, "lr_scheduler.safetensors")))
        ema_path = os.path.join(folder, "ema.safetensors")
        if self.ema is not None:
            if os.path.isfile(ema_path):
                self.ema.load_state_dict(load_state(ema_path))
            else:
                self.log(f"{self.stage.name}: {folder} has no EMA state (trained without use_ema); "
                         "the EMA starts from the loaded weights")
        tensors, metadata = load_with_metadata(os.path.join(folder, "data_order.safetensors"))
        try:
            loader = json.loads(metadata[LOADER_METADATA_KEY])
        except (KeyError, json.JSONDecodeError):
            raise ValueError(f"{folder}/data_order.safetensors has no valid {LOADER_METADATA_KEY!r} metadata") from None
        loader["order"] = tensors["order"]
        self.loader.load_state_dict(loader)
        self.rng.bit_generator.state = state["rng"]
        generators = module_generators(self.module)
        for name, g_state in state.get("module_rngs", {}).items():
            if name not in generators:
                raise ValueError(f"{folder}: saved random state for module {name!r}, which this model lacks")
            generators[name].bit_generator.state = g_state
        self.stage.load_state_dict(state.get("stage_state", {}))
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.bad_run = int(state["consecutive_bad_steps"])
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.history = read_history_csv(os.path.join(folder, "losses.csv"))

    # ================================================================== outputs
    def history_csv(self) -> str:
        """The loss history as CSV text (floats written with ``repr``, so they read back exactly)."""
        extra = sorted({k for r in self.history for k in r} - set(BASE_COLUMNS))
        columns = list(BASE_COLUMNS) + extra
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in self.history:
            writer.writerow([repr(r[c]) if isinstance(r.get(c), float) else r.get(c, "") for c in columns])
        return buf.getvalue()

    def export(self) -> None:
        """Write the final model(s) into the output folder (the EMA weights when ``use_ema``) with the
        stage's ``export_models`` (default ``save_models``), then losses.csv and losses.png. The stages
        write each model folder with ``save_pretrained``, which swaps it in atomically
        (``io.atomic_folder``): a kill leaves every folder the complete old or the complete new one.
        Data-parallel: rank 0 alone writes."""
        if not self.comm.is_root:
            return
        if self.ema is not None:
            self.ema.store()
            self.ema.copy_to()
        try:
            export = getattr(self.stage, "export_models", None) or self.stage.save_models
            with self._module_holds_masters():              # fp16: export the float32 masters
                export(self.output_dir)
        finally:
            if self.ema is not None:
                self.ema.restore()
                if self.master is not None:
                    self.master.copy_to_module()
        atomic_write_text(os.path.join(self.output_dir, "losses.csv"), self.history_csv())
        self.plot_losses(os.path.join(self.output_dir, "losses.png"))

    def plot_losses(self, path: str) -> None:
        """A PIL line plot of the per-step loss and its running mean (log scale)."""
        from npdiffusion.plotting import save_png  # noqa: PLC0415

        image = loss_plot(self.history, title=f"npdiffusion train {self.stage.name}")
        if image is not None:
            save_png(image, path)


def _quiet(*args, **kwargs) -> None:
    """The ``log`` of ranks other than 0."""


def loss_plot(history: list[dict], title: str, size=(800, 480)):
    """A PIL line plot of a loss history's per-step loss and its running mean over a 25th of the steps
    (log scale when every loss is positive); ``history`` rows as ``Trainer.history``. None when every
    step was skipped."""
    from npdiffusion.plotting import line_plot  # noqa: PLC0415

    rows = [r for r in history if not r["skipped"]]
    if not rows:
        return None
    steps = numpy.asarray([r["step"] for r in rows], dtype=numpy.float64)
    losses = numpy.asarray([r["loss"] for r in rows], dtype=numpy.float64)
    window = max(1, len(losses) // 25)
    smooth = numpy.convolve(losses, numpy.ones(window) / window, mode="valid")
    return line_plot({"loss (per step)": (steps, losses), f"mean of {window}": (steps[window - 1:], smooth)},
                     title=title, xlabel="step", ylabel="loss", logy=bool(numpy.all(losses > 0)), size=size)


def read_history_csv(path: str) -> list[dict]:
    """Rows of a ``losses.csv`` written by ``Trainer.history_csv`` (ints and floats restored exactly)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for r in reader:
            row = {}
            for k, v in r.items():
                if v == "":
                    continue
                row[k] = int(v) if k in ("step", "skipped") else float(v)
            rows.append(row)
    return rows
