"""What ``afs reproduce`` prints on stderr: a line when a stage starts, one per epoch, one when it ends::

    [afs] profile cpu: 38 stages to run (0 done before), 191 TFLOP predicted (afs/cost.py); ETA once ...
    [afs 5/38] train extractors/eps4 ...
    [afs 5/38] train extractors/eps4 · epoch 3/4 · val clean 41.2 · 31 s in stage · elapsed 4:10 · ETA ~12 min
    [afs 5/38] train extractors/eps4 done in 41 s · elapsed 4:20 · ETA ~11 min

The ETA is the cost model's FLOPs still to do (`afs.cost.stages`) times the seconds per FLOP measured so far,
so it corrects the model's optimism as the run goes. The hooks `begin`, `epoch` and `end` do nothing unless a
reporter is active (`reporting`): notebooks, tests and library callers run silent. No carriage returns, so a
CI log reads like a terminal; tqdm bars only on a terminal (`bars_enabled`).
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

from tqdm import tqdm

from afs.io import read_json

if TYPE_CHECKING:  # torch-heavy; only for annotations
    from afs.cost import Stage
    from afs.pipeline import Pipeline

Unit = tuple[str, str]  # (cost-model stage name, work item): the smallest piece the ETA counts


def bars_enabled(stream: TextIO | None = None) -> bool:
    """tqdm bars only on a terminal: redrawn with carriage returns, they would flood a CI log."""
    try:
        return bool((sys.stderr if stream is None else stream).isatty())
    except (AttributeError, ValueError):  # a closed or exotic stream
        return False


def format_duration(s: float) -> str:
    """A span for people: '0.4 s', '41 s', '3.2 min', '1.4 h'."""
    if s < 9.95:
        return f"{s:.1f} s"
    if s < 99.5:
        return f"{s:.0f} s"
    if s < 5940:
        return f"{s / 60:.1f} min" if s < 600 else f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_clock(s: float) -> str:
    """Elapsed time as a clock: '4:10', '1:02:03'."""
    h, rest = divmod(int(round(s)), 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@dataclass
class _Open:
    """The step in progress: a `begin` not yet `end`-ed."""

    number: int
    label: str
    units: list[Unit]
    started: float
    epoch_frac: float = 0.0  # finished epochs / epochs of a training stage (the ETA counts them as done)


class StageProgress:
    """Numbered stage lines and a whole-run ETA over a plan of stages (`afs.cost.Stage`). ``done``: the units
    complete before this run (`completed_units`), neither counted nor waited for; a training stage found
    complete is loaded and prints nothing. ``clock`` is injectable for tests."""

    def __init__(self, plan: Sequence["Stage"], done: Iterable[Unit] = (), *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, title: str = "") -> None:
        self.flops: dict[Unit, float] = {}
        self.stage_units: dict[str, list[Unit]] = {}
        for s in plan:
            units = self.stage_units.setdefault(s.name, [])
            for w in s.work:
                self.flops[(s.name, w.what)] = self.flops.get((s.name, w.what), 0.0) + w.flops
                units.append((s.name, w.what))
        self.remaining = set(self.flops) - set(done)
        todo = [n for n in self.stage_units if self._pending(n)]
        self.total = len(todo)  # stages to run; grows if the pipeline runs one the plan lacks
        self.skipped = len(self.stage_units) - len(todo)
        self.numbers: dict[str, int] = {}  # stage -> its number, given when it first starts
        self.spent_s = 0.0  # measured seconds of finished steps whose cost the model predicts ...
        self.spent_flops = 0.0  # ... and their predicted FLOPs: the measured rate is their ratio
        self.current: _Open | None = None
        self.stream, self.clock, self.t0, self.title = stream, clock, clock(), title

    def _pending(self, stage: str) -> bool:
        return any(u in self.remaining for u in self.stage_units.get(stage, ()))

    def begin(self, kind: str, stage: str, work: Sequence[str] | None = None) -> None:
        """A step starts: ``kind`` "train" (maybe a load of a finished stage) or "eval"; ``stage`` the cost
        model's name (``stacks/4-8_a0.5_paired [aa]``); ``work`` its items (attacks), ``None`` for all."""
        work = None if work is None else [_cost_item(w) for w in work]
        units = [u for u in self.stage_units.get(stage, []) if work is None or u[1] in work]
        if kind == "train" and units and not any(u in self.remaining for u in units):
            self.current = None  # complete before this run: loaded from its run directory, nothing to say
            return
        if stage not in self.numbers:
            if not self._pending(stage):  # not in the plan, or thought complete (its cache did not match)
                self.total += 1
                self.skipped -= stage in self.stage_units
            self.numbers[stage] = len(self.numbers) + 1
        self.remaining.update(units)  # (re)computed now, whatever the pre-check said
        label = f"{kind} {stage}" + (f" {', '.join(work)}" if work else "")
        self.current = _Open(self.numbers[stage], label, units, self.clock())
        self._say(f"{self._tag()} {label} ...")

    def epoch(self, done: int, total: int, val: Mapping[str, Any] | None = None) -> None:
        """Epoch ``done`` of ``total`` of the training step in progress has finished (`afs.runs.fit`)."""
        cur = self.current
        if cur is None:
            return
        cur.epoch_frac = done / max(total, 1)
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in (val or {}).items() if isinstance(v, (int, float)))
        now = self.clock()
        self._say(f"{self._tag()} {cur.label} · epoch {done}/{total}" + (f" · val {metrics}" if metrics else "")
                  + f" · {format_duration(now - cur.started)} in stage · elapsed {format_clock(now - self.t0)}"
                  + f" · {self.eta()}")

    def end(self) -> None:
        cur, self.current = self.current, None
        if cur is None:
            return
        seconds = self.clock() - cur.started
        flops = sum(self.flops[u] for u in cur.units)
        self.remaining.difference_update(cur.units)
        if flops > 0:  # a step the model cannot price (not in the plan) does not enter the rate
            self.spent_s += seconds
            self.spent_flops += flops
        self._say(f"{self._tag(cur.number)} {cur.label} done in {format_duration(seconds)} · "
                  f"elapsed {format_clock(self.clock() - self.t0)} · {self.eta()}")

    def remaining_flops(self) -> float:
        """Predicted FLOPs still to compute; the finished epochs of the step in progress are done work."""
        left = sum(self.flops[u] for u in self.remaining)
        cur = self.current
        if cur is not None:
            left -= cur.epoch_frac * sum(self.flops[u] for u in cur.units if u in self.remaining)
        return max(left, 0.0)

    def eta_seconds(self) -> float | None:
        """Remaining FLOPs times the measured seconds per FLOP (finished steps and epochs); None before any."""
        s, f = self.spent_s, self.spent_flops
        cur = self.current
        if cur is not None and cur.epoch_frac > 0:
            s += self.clock() - cur.started
            f += cur.epoch_frac * sum(self.flops[u] for u in cur.units)
        return s / f * self.remaining_flops() if f > 0 else None

    def eta(self) -> str:
        left = self.eta_seconds()
        if left is None:
            return "ETA unknown"
        return "ETA ~0 s" if left < 0.5 else f"ETA ~{format_duration(left)}"

    def header(self) -> None:
        self._say(f"[afs] {self.title + ': ' if self.title else ''}{self.total} stages to run ({self.skipped} done "
                  f"before), {self.remaining_flops() / 1e12:.3g} TFLOP predicted (afs/cost.py); "
                  f"ETA once the first epoch or stage is done")

    def footer(self) -> None:
        if self.numbers:
            self._say(f"[afs] {len(self.numbers)} stage(s) run in {format_clock(self.clock() - self.t0)}")

    def _tag(self, number: int | None = None) -> str:
        return f"[afs {self.current.number if number is None else number}/{self.total}]"

    def _say(self, line: str) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        tqdm.write(line, file=stream)  # above an open bar, if any, without breaking it
        stream.flush()


def _cost_item(what: str) -> str:
    """The cost model's name of a pipeline work item: the audit's ``eps16`` is ``pgd20 @ 16/255`` there."""
    m = re.fullmatch(r"eps(\d+)", what)
    return f"pgd20 @ {m.group(1)}/255" if m else what


# --- the module-level hooks (no-ops unless a reporter is active) ----------------------------------------
_active: StageProgress | None = None


@contextmanager
def reporting(reporter: StageProgress) -> Iterator[StageProgress]:
    """Make ``reporter`` receive the pipeline's `begin` / `epoch` / `end` calls within the block."""
    global _active
    previous, _active = _active, reporter
    reporter.header()
    try:
        yield reporter
    finally:
        _active = previous
        reporter.footer()


def begin(kind: str, stage: str, work: Sequence[str] | None = None) -> float:
    """Announce a step to the active reporter, if any; returns the start time (``time.time()``)."""
    if _active is not None:
        _active.begin(kind, stage, work)
    return time.time()


def epoch(done: int, total: int, val: Mapping[str, Any] | None = None) -> None:
    if _active is not None:
        _active.epoch(done, total, val)


def end() -> None:
    if _active is not None:
        _active.end()


def _accuracy(path: Path) -> dict[str, Any]:
    try:
        acc = read_json(path).get("accuracy", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return acc if isinstance(acc, dict) else {"": acc}


def completed_units(root: str | Path, plan: Sequence["Stage"]) -> set[Unit]:
    """The plan's units whose results ``root`` (a profile's run directory) already holds, read off the files
    `afs.pipeline.Pipeline` caches them in. Settings are not compared: a stale cache the pipeline recomputes
    is counted again when it starts (`StageProgress.begin`); only the display depends on this."""
    root, out = Path(root), set()
    for s in plan:
        name, _, sub = s.name.partition(" [")
        sub = sub.rstrip("]")
        for w in s.work:
            eps = re.fullmatch(r"pgd20 @ (\d+)/255", w.what)  # the audit's eps sweep, as afs.cost names it
            if not sub:  # a training stage: complete once metrics.json is written
                ok = (root / name / "metrics.json").is_file()
            elif name.startswith("audit/transfer/"):
                ok = (root / "audit" / "transfer" / f"eval_{name.rsplit('/', 1)[1]}.json").is_file()
            elif sub == "curve":
                ok = (root / name / "eval_curve.json").is_file()
            elif sub == "audit" and eps:
                ok = f"eps{eps.group(1)}" in _accuracy(root / name / "eval_audit_eps.json")
            else:
                ok = w.what in _accuracy(root / name / f"eval_{sub}.json")
            if ok:
                out.add((s.name, w.what))
    return out


def for_pipeline(pipe: "Pipeline", stream: TextIO | None = None) -> StageProgress:
    """A reporter for ``pipe.reproduce()``: the cost model's plan of the profile, less what ``pipe.root`` holds."""
    from afs import cost

    plan = cost.stages(pipe.profile)
    return StageProgress(plan, completed_units(pipe.root, plan), stream=stream,
                         title=f"profile {pipe.profile.name} on {pipe.device}")
