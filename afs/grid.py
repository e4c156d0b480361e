"""A profile's whole grid as submitit jobs (`afs reproduce --executor local|slurm`), in three phases
(`Pipeline.grid`): every extractor as one job array, then every merger as a second array (a merger needs its
members), then the evaluation as one job (`Pipeline.reproduce` finds every stage trained, writes the summary).

A job only opens the pipeline and asks for its stage, so the run store's guarantees hold inside it (a
finished stage is loaded, an interrupted one resumes, one process per stage, a stage made otherwise is
refused): a dead job costs its unfinished epoch, and the same command again resumes it. With
``gpus_per_job > 1`` an extractor job's tasks join one process group (submitit's `TorchDistributedEnvironment`
exports torchrun's variables) and train data-parallel. submitit rather than Ray: three fixed phases of
independent processes, not a dynamic task graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from afs.config import Profile


class GridJobError(RuntimeError):
    """A job of the grid failed; the message names it, its stage and the tail of its log."""


def _pipeline(profile: Profile, out: str, data_root: str | None) -> Any:
    from afs.pipeline import Pipeline

    return Pipeline(profile, out, data_root, progress=False)


def train_stage(profile: Profile, out: str, data_root: str | None, stage: tuple[Any, ...]) -> str:
    """One job of phases 1-2: train, resume or load one stage; returns its key ("extractors/eps8").

    ``stage`` is ``("extractor", budget, model_config | None)`` or ``("merger", budgets, alpha, mode)``."""
    import submitit

    from afs import distributed

    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (called directly)
        tasks = 1
    if tasks > 1:  # every task joins the job's process group, with torchrun's variables
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    ddp = tasks > 1 and distributed.init_distributed()
    try:
        pipe = _pipeline(profile, out, data_root)
        if ddp:
            pipe.device = distributed.bind_local_device()
        if stage[0] == "extractor":
            _, budget, model = stage
            pipe.extractor(budget, model)
            eps = (budget[0] / 255, budget[1] / 255) if isinstance(budget, tuple) else budget / 255
            return pipe.key(pipe.extractor_dir(eps, model))
        _, budgets, alpha, mode = stage
        pipe.stack(budgets, alpha, mode)
        return pipe.key(pipe.stack_dir(budgets, alpha, mode))
    finally:
        distributed.shutdown()


def evaluate_grid(profile: Profile, out: str, data_root: str | None) -> str:
    """Phase 3: every evaluation of `Pipeline.reproduce` (all stages found trained); returns the summary path."""
    pipe = _pipeline(profile, out, data_root)
    pipe.reproduce()
    return str(pipe.root / "summary.json")


def stages(profile: Profile, out: str, data_root: str | None) -> list[list[tuple[Any, ...]]]:
    """The grid's training stages in phase order: the extractors, then the mergers."""
    extractors, mergers = _pipeline(profile, out, data_root).grid()
    return [[("extractor", b, m) for b, m in extractors],
            [("merger", tuple(b), float(a), str(m)) for b, a, m in mergers]]


def run_grid(profile: Profile, out: str | Path, data_root: str | Path | None, executor: str, *,
             gpus_per_job: int = 1, timeout_min: int = 24 * 60, partition: str | None = None) -> str:
    """Run ``profile``'s grid on ``executor`` ("local" or "slurm") and return the summary's path. Each phase
    waits for the one before; a failed job raises `GridJobError` with its log's tail."""
    import submitit

    from afs.pipeline import run_name

    if gpus_per_job < 1:
        raise ValueError(f"--gpus-per-job must be >= 1, got {gpus_per_job}")
    out, root = str(out), None if data_root is None else str(data_root)
    folder = Path(out) / run_name(profile) / "jobs" / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    ex.update_parameters(timeout_min=timeout_min, name=f"afs-{profile.name}")
    if executor == "slurm":
        ex.update_parameters(slurm_additional_parameters={},
                             **({} if partition is None else {"slurm_partition": partition}))
    phases = stages(profile, out, root)
    for name, todo, gpus in (("extractors", phases[0], gpus_per_job), ("mergers", phases[1], 1)):
        ex.update_parameters(gpus_per_node=gpus if executor == "slurm" else 0, tasks_per_node=gpus)
        jobs = ex.map_array(train_stage, [profile] * len(todo), [out] * len(todo), [root] * len(todo), todo)
        print(f"[afs grid] {name}: {len(jobs)} job(s) submitted ({executor}), logs in {folder.parent}")
        _wait(jobs, name)
    ex.update_parameters(gpus_per_node=1 if executor == "slurm" else 0, tasks_per_node=1)
    job = ex.submit(evaluate_grid, profile, out, root)
    print(f"[afs grid] evaluation: job {job.job_id} submitted")
    (path,) = _wait([job], "evaluation")
    return path


def _wait(jobs: Sequence[Any], phase: str) -> list[Any]:
    results, failed = [], []
    for job in jobs:
        try:
            results.append(job.result())
        except Exception as e:  # submitit re-raises the job's own error (or a missing-result one)
            tail = str(e).strip().splitlines()[-12:]
            failed.append(f"job {job.job_id} ({job.paths.stderr}):\n  " + "\n  ".join(tail))
    if failed:
        raise GridJobError(f"{len(failed)} of {len(jobs)} {phase} job(s) failed; fix the cause and run the same "
                           f"command again (finished stages are kept, interrupted ones resume):\n" + "\n".join(failed))
    return results
