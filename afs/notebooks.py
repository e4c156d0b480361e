"""Execute the notebooks top to bottom (the README's main job), with the profile passed by environment.

Each notebook's parameters cell reads ``AFS_PROFILE`` (papermill convention: the cell is tagged
``parameters``, so ``papermill -p profile quick`` works too). Executed copies are written to ``out/``;
figures the notebooks save go to ``$AFS_FIGURES`` (``out/figures``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["run_notebooks"]


PATH_VARS = ("AFS_DATA", "AFS_CACHE", "AFS_RUNS", "AFS_FIGURES")


def absolute_path_vars() -> None:
    """Make the path variables absolute. Kernels run with notebooks/ as their working directory, so a
    relative path given on the command line (`AFS_DATA=../shared/data make run`, as README says) must be
    resolved where the command was typed, not where the kernel starts."""
    for var in PATH_VARS:
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).expanduser().resolve())


def run_notebooks(folder: str | Path, out: str | Path, profile: str, *, timeout: int = -1, in_place: bool = False) -> list[Path]:
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
    written = []
    for nb_path in books:
        t0 = time.time()
        print(f"[afs notebooks] {nb_path.name} (profile {profile}) ...", flush=True)
        nb = nbformat.read(nb_path, as_version=4)
        NotebookClient(nb, timeout=None if timeout < 0 else timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(folder.resolve())}}).execute()
        target = nb_path if in_place else out / nb_path.name
        nbformat.write(nb, target)
        written.append(target)
        print(f"[afs notebooks] {nb_path.name} done in {time.time() - t0:.0f} s -> {target}", flush=True)
    return written
