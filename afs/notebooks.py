"""Execute the notebooks top to bottom (the README's main job), with the profile passed by environment.

First, here in the terminal, `prepare_runs` trains and evaluates every stage the notebooks read (what
notebook 00's ``report.summary`` would otherwise do inside its kernel, where its output goes into the
notebook and the terminal sees nothing for the length of the run): numbered stage lines, epochs and an ETA
on stderr (`afs.progress`), tqdm bars on a terminal. It uses the very run directory the kernels then find
(`afs.report.runs_root`: ``$AFS_RUNS``, else ``<checkout>/runs``), so the notebooks only load what it made.

Each notebook's parameters cell reads ``AFS_PROFILE`` (papermill convention: the cell is tagged
``parameters``, so ``papermill -p profile quick`` works too). Executed copies are written to ``out/``;
figures the notebooks save go to ``$AFS_FIGURES`` (``out/figures``).
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

__all__ = ["run_notebooks", "prepare_runs"]


PATH_VARS = ("AFS_DATA", "AFS_CACHE", "AFS_RUNS", "AFS_FIGURES")


def absolute_path_vars() -> None:
    """Make the path variables absolute. Kernels run with notebooks/ as their working directory, so a
    relative path given on the command line (`AFS_DATA=../shared/data make run`, as README says) must be
    resolved where the command was typed, not where the kernel starts."""
    for var in PATH_VARS:
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())


def prepare_runs(profile: str) -> Path:
    """Train and evaluate, in this process and with the terminal watching, every stage of ``profile`` that its
    run directory lacks, and write its ``summary.json`` (`afs.report.summary`, as notebook 00 calls it: a
    current summary is read, not recomputed). Returns the run directory."""
    from afs import progress, report
    from afs.config import get_profile
    from afs.pipeline import Pipeline

    # data_root=None: $AFS_DATA, as in the kernels (`report.pipeline`); bars only on a terminal.
    pipe = Pipeline(get_profile(profile), report.runs_root(), data_root=None, progress=progress.bars_enabled())
    reporter = progress.for_pipeline(pipe)
    where = report.rel_path(pipe.root)
    if reporter.total:
        print(f"[afs notebooks] training and evaluating profile {profile} into {where} first; the notebooks then "
              f"read it", flush=True)
        with progress.reporting(reporter):
            report.summary(pipe)
    else:
        report.summary(pipe)  # assembles summary.json if only that is missing
        print(f"[afs notebooks] {where} holds every stage of profile {profile}: the notebooks only read it", flush=True)
    return pipe.root


def _release_memory() -> None:
    """Drop the models `prepare_runs` held (the kernels need the memory; on a GPU, its cache too)."""
    gc.collect()
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_notebooks(folder: str | Path, out: str | Path, profile: str, *, timeout: int = -1, in_place: bool = False,
                  prepare: bool = True) -> list[Path]:
    """Execute ``folder``'s NN_*.ipynb in order under ``profile``, copies into ``out`` (or in place).
    ``prepare``: run `prepare_runs` first, in the terminal (else notebook 00 trains inside its kernel)."""
    import nbformat
    from nbclient import NotebookClient

    folder, out = Path(folder), Path(out)
    books = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FileNotFoundError(f"no notebooks named NN_*.ipynb in {folder.resolve()}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["AFS_PROFILE"] = profile  # the kernels inherit it; each parameters cell reads it
    absolute_path_vars()
    os.environ.setdefault("AFS_FIGURES", str((out / "figures").resolve()))
    if prepare:
        prepare_runs(profile)
        _release_memory()
    written = []
    for nb_path in books:
        t0 = time.time()
        print(f"[afs notebooks] {nb_path.name} (profile {profile}) ...", flush=True)
        nb = nbformat.read(nb_path, as_version=4)
        # log_level=ERROR: each kernel would otherwise print ipykernel's notice that its local TCP sockets are
        # unencrypted into this terminal, between the notebook lines; errors still come through.
        NotebookClient(nb, timeout=None if timeout < 0 else timeout, kernel_name="python3",
                       extra_arguments=["--IPKernelApp.log_level=ERROR"],
                       resources={"metadata": {"path": str(folder.resolve())}}).execute()
        target = nb_path if in_place else out / nb_path.name
        nbformat.write(nb, target)
        written.append(target)
        print(f"[afs notebooks] {nb_path.name} done in {time.time() - t0:.0f} s -> {target}", flush=True)
    return written
