"""How many processes train each demo stage, and a stage trained as N MPI ranks.

``npdiffusion demo --processes N`` (default ``available_cores()``: the cores this process may run on)
trains each stage of ``DISTRIBUTED_STAGES`` as N ranks: ``mpiexec -n N python -m npdiffusion train
STAGE --config DIR/configs/STAGE.toml`` (``run_stage_mpi``; the math is one process's with the same
global batch, docs/distributed.md), one thread per rank. The other stages train in the demo's own
process. N shrinks to the largest divisor of the stage's batch (``stage_processes``: each rank takes
an equal share). Without mpi4py or an ``mpiexec`` (the ``mpi`` extra installs both) the demo says so in
one line and trains every stage as one process (``mpi_missing``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

#: The stages that may train as N > 1 MPI ranks (CLIP's contrastive loss over the global batch:
#: docs/distributed.md); the tokenizer is one process's work.
DISTRIBUTED_STAGES = ("clip", "vae", "unet")

#: One thread per rank: N ranks on N cores, no oversubscription (docs/distributed.md).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NPDIFFUSION_NUM_THREADS": "1"}


def available_cores() -> int:
    """The number of cores this process may run on (its CPU affinity; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_processes(processes) -> int:
    """``processes`` as an int >= 1, or a TypeError / ValueError naming it."""
    if isinstance(processes, bool) or not isinstance(processes, int):
        raise TypeError(f"demo: processes must be an int, got {type(processes).__name__}")
    if processes < 1:
        raise ValueError(f"demo: processes must be at least 1, got {processes}")
    return processes


def find_mpiexec() -> str | None:
    """The ``mpiexec`` next to this Python (a venv's ``bin/``, where the mpich wheel puts it), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    return shutil.which("mpiexec")


def mpi_missing() -> str | None:
    """Why the stages cannot run as MPI ranks here (one phrase), or None when they can."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    if find_mpiexec() is None:
        return "no mpiexec next to Python or on PATH"
    return None


def stage_processes(name: str, config, processes: int) -> int:
    """How many ranks train stage ``name`` (its ``config``): 1 unless it is in ``DISTRIBUTED_STAGES``,
    else the largest divisor of its ``train.batch_size`` that is at most ``processes``."""
    if name not in DISTRIBUTED_STAGES:
        return 1
    batch = config.train.batch_size
    return max(n for n in range(1, min(processes, batch) + 1) if batch % n == 0)


def run_stage_mpi(name: str, config_path: str, processes: int, progress=None, log=print) -> str:
    """Train stage ``name`` from ``config_path`` as ``processes`` MPI ranks; every line rank 0 prints but
    the last goes to ``log``, the last (the stage's summary) is returned. A TrainingError (one line)
    when the launch fails; the ranks' own error lines are on stderr above it."""
    from npdiffusion.training.loop import TrainingError  # noqa: PLC0415

    command = [find_mpiexec() or "mpiexec", "-n", str(processes), sys.executable, "-m", "npdiffusion", "train",
               name, "--config", config_path]
    if progress is False:
        command.append("--no-progress")
    env = {**os.environ, **ONE_THREAD}
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            if lines:
                log(lines[-1])
            lines.append(line.rstrip("\n"))
    if proc.returncode != 0 or not lines:
        raise TrainingError(f"the {name} stage failed as {processes} MPI processes (exit code {proc.returncode}); "
                            f"rerun it alone: {' '.join(command[:3])} {' '.join(command[3:])}")
    return lines[-1]
