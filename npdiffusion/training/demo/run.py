"""``run_demo``: train the four stages, then evaluate, draw and report (package docstring).
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import time

import numpy

from npdiffusion.training.demo.evaluation import eval_scheduler, evaluate, evaluate_digits, vae_round_trip_digits
from npdiffusion.training.demo.pictures import diffusion_png, losses_png, samples_png
from npdiffusion.training.demo.processes import available_cores, check_processes, mpi_missing, run_stage_mpi, stage_processes
from npdiffusion.training.demo.report import DemoRun, digits_report, report_record, shapes_report
from npdiffusion.training.demo.settings import (
    DEFAULT_SEED,
    DIGIT_SEEDS,
    EVAL_PROMPTS,
    EVAL_SEEDS,
    EVAL_STEPS,
    GUIDANCE_SCALE,
    check_dataset,
    check_seed,
    stage_configs,
)


def limit_blas_threads(n: int = 1) -> bool:
    """Ask the OpenBLAS that NumPy loaded to use ``n`` threads (via its C API); False if none was found."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return False
    done = False
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                    "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and by its children that have ended (a stage's MPI ranks)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_demo(out: str = "npdiffusion-demo", quick: bool = False, progress=None, log=print,
             dataset: str = "shapes", seed: int = DEFAULT_SEED, processes: int | None = 1) -> str:
    """Train every stage on ``dataset`` ("shapes" or "digits") into ``out`` and write the pictures and
    report (module docstring); returns the one-line summary. ``seed``: every model stage's
    ``train.seed``; ``processes``: MPI ranks per distributed stage (None: every core this process may
    use, the CLI's default; ``processes.py``), one when MPI is missing (said in one ``log`` line). The digits need
    scikit-learn (checked first: ``MissingDependencyError`` before anything is written)."""
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415
    from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage  # noqa: PLC0415
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415
    from npdiffusion.training.checkpoint import prepare_output_dir  # noqa: PLC0415
    from npdiffusion.training.config import config_to_dict, config_to_toml  # noqa: PLC0415
    from npdiffusion.training.loop import read_history_csv  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415

    digits = check_dataset(dataset) == "digits"
    check_seed(seed)
    processes = available_cores() if processes is None else check_processes(processes)
    if digits:
        from npdiffusion.evaluation.digits import require_sklearn  # noqa: PLC0415

        require_sklearn()
    start = time.perf_counter()
    out = prepare_output_dir(out)
    if os.path.isdir(os.path.join(out, "runs")):
        from npdiffusion.training.loop import TrainingError  # noqa: PLC0415

        raise TrainingError(f"{out!r} already holds a demo run (its runs/ folder); choose another --out or "
                            "delete that folder first")
    blas_one = limit_blas_threads(1)
    from npdiffusion import parallel  # noqa: PLC0415

    # One thread for element-wise work too: at the demo's sizes handing parts to a second thread
    # costs more than it saves (docs/benchmarks.md, "Element-wise threads at the demo's size").
    parallel.set_num_threads(1)
    configs = stage_configs(out, quick, dataset, seed)
    missing = mpi_missing() if processes > 1 else None
    if missing is not None:
        log(f"demo: training every stage as one process, not {processes}: {missing} (the mpi extra installs "
            "both: pip install -e \".[mpi]\")")
        processes = 1
    ranks = {name: stage_processes(name, cfg, processes) for name, cfg in configs.items()}
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    for name, cfg in configs.items():
        atomic_write_text(os.path.join(out, "configs", f"{name}.toml"),
                          f"# npdiffusion train {name} --config {name}.toml  (written by npdiffusion demo)\n"
                          + config_to_toml(config_to_dict(cfg)))
    times, cpu, summaries = {}, {}, {}
    for name, module in (("tokenizer", tokenizer_stage), ("clip", clip_stage), ("vae", vae_stage), ("unet", unet_stage)):
        t0, c0 = time.perf_counter(), cpu_seconds()
        if ranks[name] > 1:
            summaries[name] = run_stage_mpi(name, os.path.join(out, "configs", f"{name}.toml"), ranks[name],
                                            progress=progress, log=log)
        elif name == "unet":
            from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

            summaries[name] = run_model_stage(configs[name], unet_stage.build_stage, progress=progress, log=log)
        else:
            summaries[name] = module.train(configs[name], progress=progress, log=log)
        times[name], cpu[name] = time.perf_counter() - t0, cpu_seconds() - c0
        log(summaries[name])
    model = os.path.join(out, "model")
    unet_stage.write_pipeline(configs["unet"], model)
    histories = {n: read_history_csv(os.path.join(configs[n].output_dir, "losses.csv")) for n in ("clip", "vae", "unet")}
    losses_png(histories, os.path.join(out, "losses.png"))

    t0, c0 = time.perf_counter(), cpu_seconds()
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = eval_scheduler(pipe.scheduler.config)
    steps = 4 if quick else EVAL_STEPS
    if digits:
        from npdiffusion.evaluation.digits import train_classifier  # noqa: PLC0415

        clf, _ = train_classifier()
        n_prompts, n_seeds = 10, (1 if quick else DIGIT_SEEDS)
        scores = evaluate_digits(pipe, n_seeds, GUIDANCE_SCALE, steps, clf)
    else:
        n_prompts, n_seeds = (4, 2) if quick else (EVAL_PROMPTS, EVAL_SEEDS)
        scores = evaluate(pipe, n_prompts, n_seeds, GUIDANCE_SCALE, steps)
    times["evaluation"], cpu["evaluation"] = time.perf_counter() - t0, cpu_seconds() - c0
    t0, c0 = time.perf_counter(), cpu_seconds()
    data = dataset_from_config(configs["unet"].data)
    if digits:
        from npdiffusion.evaluation.digits import score as digit_score  # noqa: PLC0415

        n_vae = 20 if quick else 200
        real = digit_score(data.get_images(numpy.arange(len(data))), data.labels, clf).overall
        vae = vae_round_trip_digits(pipe, data, clf, n_vae)
    samples_png(pipe, os.path.join(out, "samples.png"), GUIDANCE_SCALE, steps, dataset)
    diffusion_png(pipe, data, os.path.join(out, "diffusion.png"), GUIDANCE_SCALE, steps)
    times["pictures"], cpu["pictures"] = time.perf_counter() - t0, cpu_seconds() - c0
    total = time.perf_counter() - start
    measured = DemoRun(out=out, model=model, dataset=dataset, quick=quick, blas_one=blas_one, times=times,
                       seed=seed, processes=ranks, cpu=cpu,
                       summaries=summaries, total=total, train_seconds=sum(times[n] for n in configs),
                       n_prompts=n_prompts, n_seeds=n_seeds, steps=steps)
    if digits:
        text, summary = digits_report(measured, scores, len(data), configs["unet"].data.resolution, real, vae, n_vae)
    else:
        text, summary = shapes_report(measured, scores, configs["unet"].data.num_images)
    atomic_write_text(os.path.join(out, "report.md"), text)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report_record(measured, scores), indent=1))
    return summary
