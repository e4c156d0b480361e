"""Execute the notebooks top to bottom (the README's main job), with the profile passed by environment.

First `prepare_runs` trains and evaluates, here in the terminal, every stage the notebooks read (inside
notebook 00's kernel the terminal would see nothing for the length of the run), in the very run directory
the kernels then find (`afs.report.runs_root`). Each notebook's parameters cell (tagged ``parameters``, the
papermill convention) reads ``AFS_PROFILE``; executed copies go to ``out/``, figures to ``$AFS_FIGURES``.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path


def absolute_path_vars() -> None:
    """Make the path variables absolute: kernels run in notebooks/, so a relative path from the command line
    (`AFS_DATA=../shared/data make run`) must be resolved where the command was typed."""
    for var in ("AFS_DATA", "AFS_CACHE", "AFS_RUNS", "AFS_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())


def prepare_runs(profile: str) -> Path:
    """Train and evaluate every stage of ``profile`` that its run directory lacks, with stage lines, epochs
    and an ETA on stderr (`afs.progress`), and write its ``summary.json`` (`afs.report.summary`, as notebook
    00 calls it). Returns the run directory."""
    from afs import progress, report

    pipe = report.pipeline(profile, progress=progress.bars_enabled())  # bars only on a terminal
    reporter, where = progress.for_pipeline(pipe), report.rel_path(pipe.root)
    if reporter.total:
        print(f"[afs notebooks] training and evaluating profile {profile} into {where} first; the notebooks then "
              f"read it", flush=True)
        with progress.reporting(reporter):
            report.summary(pipe)
    else:
        report.summary(pipe)  # assembles summary.json if only that is missing
        print(f"[afs notebooks] {where} holds every stage of profile {profile}: the notebooks only read it", flush=True)
    return pipe.root


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
        import torch

        gc.collect()  # the kernels need the memory the models held
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    written = []
    for nb_path in books:
        t0 = time.time()
        print(f"[afs notebooks] {nb_path.name} (profile {profile}) ...", flush=True)
        nb = nbformat.read(nb_path, as_version=4)
        # log_level=ERROR: else each kernel prints ipykernel's notice that its local TCP sockets are unencrypted
        # into this terminal, between the notebook lines; errors still come through.
        NotebookClient(nb, timeout=None if timeout < 0 else timeout, kernel_name="python3",
                       extra_arguments=["--IPKernelApp.log_level=ERROR"],
                       resources={"metadata": {"path": str(folder.resolve())}}).execute()
        target = nb_path if in_place else out / nb_path.name
        nbformat.write(nb, target)
        written.append(target)
        print(f"[afs notebooks] {nb_path.name} done in {time.time() - t0:.0f} s -> {target}", flush=True)
    return written
