"""A profile's whole grid on an executor: `afs reproduce --executor local|slurm`, through submitit.

The grid (`Pipeline.grid`) runs in three phases, each phase's jobs side by side:

1. every extractor, as one job array (one job per network; Table I's budgets and Table VI's two ablations);
2. every merger, as a second array once the extractors are done (a merger needs all its members);
3. the evaluation, one job: `Pipeline.reproduce` finds every stage trained and writes ``summary.json``.

Each job is a separate process (``local``: on this machine; ``slurm``: a SLURM job, submitted by
submitit's executor, its logs under ``<out>/<profile>/jobs/``). A job only opens the pipeline and asks for
its stage, so everything the run store guarantees holds inside it: a finished stage is loaded, an
interrupted one resumes from ``state.pt``, a stage is trained by one process at a time (its lock), and a
stage made otherwise is refused. A job that dies therefore costs only its unfinished epoch: submitting the
grid again (the same command) resumes it, and the finished stages are skipped.

With ``gpus_per_job > 1`` an extractor job runs that many tasks, one per GPU, joined into one process
group by submitit's `TorchDistributedEnvironment` (the variables torchrun would set), and trains
data-parallel exactly as under torchrun (`afs.distributed`). Mergers and the evaluation run as one task.

Ray was considered: its scheduler, object store and dashboard serve dynamic task graphs, and this grid is
three fixed phases of independent processes; submitit is one small package that speaks SLURM and has a
local executor for one machine and for the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from afs.config import Profile

__all__ = ["EXECUTORS", "GridJobError", "run_grid", "train_stage", "evaluate_grid", "stages"]

EXECUTORS = ("none", "local", "slurm")  # none: every stage in this process (plain `afs reproduce`)


def _pipeline(profile: Profile, out: str, data_root: str | None) -> Any:
    from afs.pipeline import Pipeline

    return Pipeline(profile, out, data_root, progress=False)


def train_stage(profile: Profile, out: str, data_root: str | None, stage: tuple[Any, ...]) -> str:
    """One job of phases 1-2: train, resume or load one stage; returns its key ("extractors/eps8").

    ``stage`` is ``("extractor", budget, model_config | None)`` or ``("merger", budgets, alpha, mode)``.
    Under a multi-task job (``gpus_per_job > 1``) every task joins the job's process group first."""
    from afs import distributed

    ddp = _join_job_group()
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


def _join_job_group() -> bool:
    """In a submitit job of several tasks: export torchrun's variables and join the process group."""
    import submitit

    from afs import distributed

    try:
        tasks = submitit.JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (called directly)
        return False
    if tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return distributed.init_distributed()


def stages(profile: Profile, out: str, data_root: str | None) -> list[list[tuple[Any, ...]]]:
    """The grid's training stages in phase order: the extractors, then the mergers."""
    extractors, mergers = _pipeline(profile, out, data_root).grid()
    return [[("extractor", b, m) for b, m in extractors],
            [("merger", tuple(b), float(a), str(m)) for b, a, m in mergers]]


def run_grid(profile: Profile, out: str | Path, data_root: str | Path | None, executor: str, *,
             gpus_per_job: int = 1, timeout_min: int = 24 * 60, partition: str | None = None,
             slurm_args: dict[str, Any] | None = None, say: Any = print) -> str:
    """Run ``profile``'s grid on ``executor`` ("local" or "slurm") and return the summary's path.

    Waits for each phase before the next; a failed job raises `GridJobError` with its log's tail (fix,
    then run the same command again: finished stages are kept, the interrupted one resumes)."""
    import submitit

    from afs.pipeline import run_name

    if executor not in ("local", "slurm"):
        raise ValueError(f"executor must be 'local' or 'slurm' for a job grid, got {executor!r}")
    if isinstance(gpus_per_job, bool) or not isinstance(gpus_per_job, int) or gpus_per_job < 1:
        raise ValueError(f"gpus_per_job must be an int >= 1, got {gpus_per_job!r}")
    out, root = str(out), None if data_root is None else str(data_root)
    folder = Path(out) / run_name(profile) / "jobs" / "%j"
    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    params: dict[str, Any] = {"timeout_min": timeout_min, "name": f"afs-{profile.name}"}
    if executor == "slurm":
        params.update(slurm_partition=partition, slurm_additional_parameters=dict(slurm_args or {}))
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    phases = stages(profile, out, root)
    for name, todo, gpus in (("extractors", phases[0], gpus_per_job), ("mergers", phases[1], 1)):
        ex.update_parameters(gpus_per_node=gpus if executor == "slurm" else 0, tasks_per_node=gpus)
        jobs = ex.map_array(train_stage, [profile] * len(todo), [out] * len(todo), [root] * len(todo), todo)
        say(f"[afs grid] {name}: {len(jobs)} job(s) submitted ({executor}), logs in {folder.parent}")
        _wait(jobs, name)
    ex.update_parameters(gpus_per_node=1 if executor == "slurm" else 0, tasks_per_node=1)
    job = ex.submit(evaluate_grid, profile, out, root)
    say(f"[afs grid] evaluation: job {job.job_id} submitted")
    (path,) = _wait([job], "evaluation")
    return path


class GridJobError(RuntimeError):
    """A job of the grid failed; the message names it, its stage and the tail of its log."""


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

