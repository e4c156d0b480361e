"""Evaluation protocol of the paper: clean accuracy, PGD-10/PGD-20 and AutoAttack, per sample.

Section III, "Evaluation protocol": PGD with eps = 8/255 and step 2/255, 10 and 20 steps, on the whole
model (for AFS the whole stack, so the attack is adaptive), and AutoAttack (``version="standard"``).
Robustness means accuracy on adversarial examples at 8/255; the trade-off of Table IV is the mean of
clean and AutoAttack accuracy.

:func:`evaluate` runs any mix of ``"clean"``, ``"pgdK"`` (K steps), ``"fgsm"`` and ``"aa"`` over a whole
test set in batches and keeps per-sample correctness, so later analyses (which samples the stack saves,
agreement between attacks) need no rerun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from afs import distributed
from afs.attacks import PGD, check_images, check_labels, eval_mode, fgsm, model_device
from afs.autoattack import autoattack
from afs.io import derive_seed

__all__ = ["EvalResult", "evaluate", "trade_off", "parse_attack", "attack_key", "PROTOCOL"]

# The version of what an accuracy means, part of every cached evaluation's identity (`afs.pipeline`): 2 =
# an image is robust only if it is also right clean, and PGD-K's of one call share a start (one chain);
# 3 = batch b's starts are seeded by derive_seed("eval", seed, b).
PROTOCOL = 3

_PGD_NAME = re.compile(r"(pgd|cw)([1-9][0-9]*)(?:x([1-9][0-9]*))?")
_VALID_FORMS = ("'clean', 'fgsm', 'aa' (AutoAttack), 'pgdK' with K >= 1 steps (e.g. 'pgd10', 'pgd20'), "
                "'pgdKxR' (K steps, R random restarts, e.g. 'pgd50x2') or 'cwK' / 'cwKxR' (PGD on the CW margin loss)")


@dataclass
class EvalResult:
    """Accuracies (percent) and per-sample correctness of one evaluation, keyed by attack name."""

    accuracy: dict[str, float]  # e.g. {"clean": 84.1, "pgd10": 55.0}, percent of n
    correct: dict[str, torch.Tensor] = field(repr=False)  # bool [n] on the CPU, True = still correct
    n: int  # number of evaluated samples

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part (for ``metrics.json``): n and the accuracies."""
        return {"n": self.n, "accuracy": dict(self.accuracy)}


def parse_attack(name: Any) -> tuple[str, int, int]:
    """``"pgd20"`` -> ``("pgd", 20, 1)``; ``"pgd50x2"`` -> ``("pgd", 50, 2)``; ``"cw20"`` -> ``("cw", 20, 1)``;
    ``"clean"``/``"fgsm"``/``"aa"`` -> ``(name, 0, 1)``; else ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"attack names are strings, got {type(name).__name__}: {name!r}; valid forms: {_VALID_FORMS}")
    key = name.strip().lower()
    if key in ("clean", "fgsm", "aa"):
        return key, 0, 1
    m = _PGD_NAME.fullmatch(key)
    if m is None:
        raise ValueError(f"unknown attack {name!r}; valid forms: {_VALID_FORMS}")
    return m.group(1), int(m.group(2)), int(m.group(3) or 1)


def attack_key(kind: tuple[str, int, int]) -> str:
    """The canonical name of a parsed attack (``("pgd", 20, 1)`` -> ``"pgd20"``)."""
    name, steps, restarts = kind
    if name not in ("pgd", "cw"):  # clean, fgsm, aa: no steps in the name
        return name
    return f"{name}{steps}" + (f"x{restarts}" if restarts > 1 else "")


def _as_images(x: Any) -> torch.Tensor:
    # uint8 images are accepted (converted per batch to [0, 1]); float images must already be in [0, 1].
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D image batch (N, C, H, W), got shape {tuple(x.shape)}")
        return x
    return check_images(x)


def _to_unit(xb: torch.Tensor) -> torch.Tensor:
    # uint8 0..255 -> float32 in [0, 1]; float input is already there.
    return xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] = ("clean", "pgd10", "pgd20"),
    *,
    eps: float = 8 / 255,  # Section III: L-inf eps 8/255, PGD step 2/255
    step_size: float = 2 / 255,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    aa_kwargs: dict[str, Any] | None = None,
    compile: bool = False,
    batches: Sequence[int] | None = None,
    craft_on: nn.Module | None = None,
    craft_precision: str = "fp32",
) -> EvalResult:
    """Accuracy of ``model`` on ``(x, y)`` under each attack in ``attacks``, with per-sample flags.

    Args:
        model: returns logits for [0, 1] images (a single net or a whole stacked model).
        x: (N, C, H, W) uint8 (divided by 255 here) or float in [0, 1]; any device (moved per batch).
        y: integer labels [N].
        attacks: ``"clean"``, ``"pgdK"`` (K-step PGD from a uniform random start, eps/step_size below),
            ``"fgsm"`` (one step of size eps) and ``"aa"`` (:func:`afs.autoattack.autoattack` on all of x).
        eps, step_size: the threat model (paper: 8/255 and 2/255).
        batch_size: samples per batch for clean/PGD/FGSM (and AutoAttack's, unless ``aa_kwargs`` sets it).
        seed: fixes every random start: batch b's PGD starts use a seed derived from (seed, b), so results
            repeat for a seed and batch size, whatever order batches run in. AutoAttack gets ``seed`` itself.
        device: where the model runs; default its parameters' device. progress: a tqdm bar over batches.
        aa_kwargs: extra keywords for :func:`afs.autoattack.autoattack` (``version``, ``state_path``, ...).
        compile: run PGD through the compiled attack loop (GPU speed; same results within float noise).
        craft_on: a transfer attack: PGD/FGSM examples are crafted on this model (same seeds) and scored on
            ``model`` (the audit's "transfer from a member onto the stack"). ``None``: white-box.
        craft_precision: ``"bf16"`` crafts every attack under bf16 autocast (several times faster on AMX CPUs
            and GPUs); clean and PGD/FGSM accuracies are still scored by an fp32 forward of ``model`` (the
            attack loses < 0.5 point of strength, tests check); AutoAttack's own flags are under bf16.
        batches: run clean/PGD/FGSM on these batch indices only (the cuts of ``batch_size`` above, each with
            its own seed), leaving the other samples' flags False. ``None``: every batch, and under a
            process group (torchrun) the batches are shared out among the ranks (:func:`_sharded`).

    An image counts as correct under an attack only if it is also right clean (as in AutoAttack). The
    model is in eval mode throughout; every submodule's mode is restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    if isinstance(attacks, str):
        attacks = (attacks,)  # a single name, not its characters
    if len(attacks) == 0:
        raise ValueError(f"attacks is empty; give at least one of: {_VALID_FORMS}")
    # Canonical name -> (kind, steps, restarts), in the order first asked for ("PGD20" and "pgd20" are one).
    kinds = {attack_key(kind): kind for kind in map(parse_attack, attacks)}
    names = list(kinds)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    kw = dict(eps=eps, step_size=step_size, batch_size=batch_size, seed=seed, device=device, aa_kwargs=aa_kwargs,
              compile=compile, craft_on=craft_on, craft_precision=craft_precision)
    if batches is None and distributed.is_distributed():
        return _sharded(model, x, y, names, progress, kw)
    if craft_on is not None and not isinstance(craft_on, nn.Module):
        raise TypeError(f"craft_on must be a torch.nn.Module (the transfer source), got {type(craft_on).__name__}")
    if craft_on is not None and "aa" in kinds:
        raise ValueError("AutoAttack is white-box only: it cannot run as a transfer attack (craft_on=...)")
    if craft_precision not in ("fp32", "bf16"):
        raise ValueError(f"craft_precision must be 'fp32' or 'bf16', got {craft_precision!r}")
    x = _as_images(x)  # (N, C, H, W), uint8 or float in [0, 1], left where it is until batched
    n = x.shape[0]
    y = check_labels(y, n, y.device if isinstance(y, torch.Tensor) else torch.device("cpu"))
    dev = torch.device(device) if device is not None else model_device(model)
    if n > 0:
        # One-sample probe: a wrong output shape or an out-of-range label fails here, clearly, not mid-run.
        with eval_mode(model), torch.no_grad():
            probe = model(_to_unit(x[:1].to(dev)))  # (1, n_classes)
        if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
            got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ValueError(f"the model must return logits of shape (B, n_classes), got {got}")
        check_labels(y, n, y.device, n_classes=probe.shape[1])

    source = model if craft_on is None else craft_on  # the network the attacks differentiate
    aa_model = model  # AutoAttack is white-box: always the evaluated model
    if craft_precision == "bf16":
        from afs.runs import AutocastModel

        source, aa_model = AutocastModel(source, dev.type), AutocastModel(model, dev.type)
    # One attack object per name (validates eps/step_size now, before any batch runs).
    # Single-restart CE PGDs share a batch's random start, so they form one chain: the shortest runs from
    # the start, each longer one continues from the previous one's output for the remaining steps (PGD-10
    # then 10 more steps = PGD-20, bit for bit; `PGD(start_from=)`), and PGD-10 + PGD-20 cost 20 steps.
    chain = sorted((k for k in kinds if kinds[k][0] == "pgd" and kinds[k][2] == 1), key=lambda k: kinds[k][1])
    objs: dict[str, PGD] = {}
    done_steps = 0
    for key in chain:
        steps = kinds[key][1]
        objs[key] = PGD(source, eps=eps, step_size=step_size, steps=steps - done_steps, compile=compile)
        done_steps = steps
    for key, (kind, steps, restarts) in kinds.items():
        if kind in ("pgd", "cw") and key not in objs:  # restarts, or the CW margin loss: a chain of its own
            objs[key] = PGD(source, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                            compile=compile and kind == "pgd", loss="ce" if kind == "pgd" else "margin")
        elif kind == "fgsm":
            objs[key] = fgsm(source, eps=eps, compile=compile)
    batched = [k for k in names if kinds[k][0] != "aa"]  # run batch by batch below
    attacked = chain + [k for k in batched if k not in chain and k != "clean"]  # the chain first, in step order
    correct = {k: torch.zeros(n, dtype=torch.bool) for k in names}  # bool [N] per attack, on the CPU

    with eval_mode(model), eval_mode(source):
        n_batches = (n + batch_size - 1) // batch_size  # cuts of batch_size, the last one possibly short
        todo = range(n_batches) if batches is None else [int(b) for b in batches]
        if any(not 0 <= b < n_batches for b in todo):
            raise ValueError(f"batches must be indices in [0, {n_batches}) for n={n}, batch_size={batch_size}")
        if batched:
            bar = tqdm(total=len(todo), desc="evaluate", unit="batch", disable=not progress, leave=False)
            try:
                for b in todo:
                    sl = slice(b * batch_size, min((b + 1) * batch_size, n))
                    xb = _to_unit(x[sl].to(dev, non_blocking=True))  # (B, C, H, W) float in [0, 1]
                    yb = y[sl].to(dev, non_blocking=True)
                    bseed = derive_seed("eval", seed, b)  # shared by every attack of this batch (one chain)
                    # Robust accuracy is the share of images classified correctly at *every* point of the
                    # ball, the clean image included: an image the model gets wrong clean is not robust
                    # under any attack (AutoAttack counts the same way). So the attacks run on the images
                    # the model classifies correctly, which also saves their cost on the rest.
                    with torch.no_grad():
                        right = (model(xb).argmax(1) == yb).cpu()
                    if "clean" in correct:
                        correct["clean"][sl] = right
                    idx = right.nonzero().squeeze(1)  # (R,) the right-clean images of this batch
                    if attacked and len(idx) > 0:
                        xs, ys = xb[idx.to(xb.device)], yb[idx.to(yb.device)]
                        rows = torch.arange(sl.start, sl.stop)[idx]  # their places in the test set
                        x_prev = None
                        for key in attacked:
                            if key in chain:
                                x_eval = x_prev = objs[key](xs, ys, seed=bseed, start_from=x_prev)
                            else:
                                x_eval = objs[key](xs, ys, seed=bseed)
                            with torch.no_grad():  # scored by `model` itself (a transfer attack crafted on craft_on)
                                correct[key][rows] = (model(x_eval).argmax(1) == ys).cpu()
                    bar.update(1)
                    if batches is None:  # running accuracy over the prefix done so far
                        done = {k: 100.0 * correct[k][: sl.stop].float().mean().item() for k in batched}
                        bar.set_postfix({k: f"{v:.1f}" for k, v in done.items()})
            finally:
                bar.close()
        if "aa" in kinds:  # AutoAttack on all of x at once: it batches (and resumes from state_path) itself
            aa = {"eps": eps, "seed": seed, "device": dev, "batch_size": batch_size, **(aa_kwargs or {})}
            correct["aa"] = autoattack(aa_model, _to_unit(x), y, **aa).robust.cpu()
    return _result(correct, n)


def _result(correct: dict[str, torch.Tensor], n: int) -> EvalResult:
    # Accuracy in percent of all n images (NaN for an empty set), in the order the attacks were asked for.
    accuracy = {k: 100.0 * flags.float().mean().item() if n > 0 else float("nan") for k, flags in correct.items()}
    return EvalResult(accuracy=accuracy, correct=correct, n=n)


def _sharded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], progress: bool,
             kw: dict[str, Any]) -> EvalResult:
    """:func:`evaluate` with its batches split across the ranks of the process group; the same result
    (identical on every rank)."""
    # The set is cut into batches exactly as a single process cuts it and rank r takes batches r, r + w,
    # ...; each batch keeps its own seed, so clean/PGD/FGSM per-sample results equal the one-process ones.
    # AutoAttack runs on each rank's images (its own batching then sees another split, so its per-sample
    # flags can differ from one process's, not its protocol); a state_path in aa_kwargs gets a rank suffix.
    batched = [a for a in names if a != "aa"]
    n, bs = x.shape[0], kw["batch_size"]
    r, w = distributed.rank(), distributed.world_size()
    mine = list(range(r, -(-n // bs), w))  # round robin: the last, short batch costs no rank more than one batch
    # (A+1, N): one row of flags per attack, and a coverage row that checks every image is evaluated once.
    flags = torch.zeros(len(names) + 1, n, dtype=torch.int32)
    for b in mine:
        flags[-1, b * bs:min((b + 1) * bs, n)] += 1
    # Every rank calls evaluate, so a bad argument stops all ranks, not one.
    res = evaluate(model, x, y, batched or ["clean"], progress=progress and distributed.is_main(), batches=mine, **kw)
    for key in batched:
        flags[names.index(key)] = res.correct[key].to(torch.int32)
    if "aa" in names and mine:
        idx = torch.cat([torch.arange(b * bs, min((b + 1) * bs, n)) for b in mine])
        aa = dict(kw["aa_kwargs"] or {})
        if aa.get("state_path") is not None:
            p = Path(aa["state_path"])
            aa["state_path"] = p.with_name(f"{p.stem}.rank{r}of{w}{p.suffix}")
        res = evaluate(model, x[idx], y[idx], ("aa",), progress=progress and distributed.is_main(), batches=[],
                       **{**kw, "aa_kwargs": aa})
        flags[names.index("aa"), idx] = res.correct["aa"].to(torch.int32)
    # Summed over ranks into test-set order (each image's flags come from the one rank that ran it).
    flags = torch.tensor(distributed.all_reduce_sums(flags.flatten().tolist())).round().to(torch.int32).view_as(flags)
    if not bool((flags[-1] == 1).all()):
        raise RuntimeError("sharded evaluation did not cover every test image exactly once (ranks disagree on the "
                           "test set or batch size)")
    return _result({k: flags[i].bool() for i, k in enumerate(names)}, n)


def trade_off(clean: float, aa: float) -> float:
    """Table IV's trade-off score: the mean of clean and AutoAttack accuracy (same units as the inputs)."""
    return (float(clean) + float(aa)) / 2.0
