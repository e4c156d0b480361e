"""What a network costs (`network_cost`, the one count: Table VI, the estimate, the ETA) and what a profile's
``afs reproduce`` costs stage by stage, predicted from FLOP counts (``afs profiles --estimate``).

The unit is one *pass*: a forward of one image. A forward + backward is ``FWD_BWD`` = 3 passes, for PGD's
input-gradient step and SGD's step alike (an attack skips the weight gradients, so 3 over-counts it a little;
the measured CPU rate absorbs that). A stage is a sum of `Work` items, images x passes x FLOPs per pass, read
off the profile exactly as `afs.pipeline.Pipeline` runs it: a PGD-K AT epoch is ``n_train x (K + 1)``
forward+backward passes plus a validation of clean + PGD-K; a merger epoch over m members is m x that through
the members; an evaluation PGD-K is ``3K + 1`` passes per image, ``pgdKxR`` ``R x (3K + 1) + 1``.

Not modelled: data decoding, ``torch.compile``, Python and kernel-launch overhead (large for narrow networks
at small batches), checkpoint I/O, the merger head: a floor on compute at the stated throughput.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from afs.audit import audit_attacks
from afs.config import MergerMode, ModelConfig, Profile, eps_from_budget
from afs.evaluation import parse_attack
from afs.merger import split_count
from afs.models import build_model, model_cost

__all__ = ["Work", "Stage", "Throughput", "H200", "network_cost", "attack_passes", "AUTOATTACK_PASSES", "stages",
           "measure_cpu", "throughput_for", "format_estimate"]

FWD_BWD = 3.0  # passes in one forward + backward (backward ~ 2 forwards)
_TRAIN_IMAGES, _TEST_IMAGES = 50_000, 10_000  # CIFAR-10/100 split sizes: the estimate needs no data on disk

# AutoAttack "standard" (L-inf), pyautoattack 0.2: APGD-CE (100 iterations) on the clean-correct images, then
# on those still robust APGD-T (9 targets x 100), FAB-T (9 x 100, each a forward+backward and a forward) and
# Square (5000 queries of one forward). ASSUMPTION: the fractions reaching each attack, typical of an 8/255
# PGD-AT CIFAR-10 model (clean ~80%, robust after APGD-CE ~50%).
AA_CLEAN_FRACTION, AA_ROBUST_FRACTION = 0.8, 0.5
AUTOATTACK_PASSES: dict[str, float] = {
    "clean": 1.0,
    "APGD-CE": AA_CLEAN_FRACTION * 100 * FWD_BWD,
    "APGD-T": AA_ROBUST_FRACTION * 9 * 100 * FWD_BWD,
    "FAB-T": AA_ROBUST_FRACTION * 9 * 100 * (FWD_BWD + 1),
    "Square": AA_ROBUST_FRACTION * 5000 * 1.0,
}  # ~5,900 passes per image, ~100x a PGD-20 evaluation


def network_cost(model: nn.Module | ModelConfig, num_classes: int = 10, members: int = 1) -> dict[str, float]:
    """The one count of a network's cost: parameters and forward FLOPs of one 1x3x32x32 image
    (`afs.models.model_cost`, torch.utils.flop_counter), also in Table VI's units ``params_M``, ``flops_G``
    and ``macs_G`` (the paper's "Flops" are MACs, half the FLOPs). A `ModelConfig` is counted on the ``meta``
    device (no memory, no compute: WRN-28-30 is free); with ``members`` > 1, as a stack of that many plus one
    merger (the members without their heads, the merger reading all their features)."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if isinstance(model, ModelConfig):
        return dict(_config_cost(model, num_classes, members))  # a copy: the cache's stays as counted
    c = model_cost(model)
    return {**c, "params_M": c["params"] / 1e6, "flops_G": c["flops"] / 1e9, "macs_G": c["flops"] / 2e9}


@functools.cache
def _config_cost(mc: ModelConfig, num_classes: int, members: int) -> dict[str, float]:
    with torch.device("meta"):
        net = build_model(mc, num_classes)
        c = network_cost(net)
    if members == 1:
        return c
    head, fd = sum(p.numel() for p in net.head.parameters()), net.feature_dim
    params = members * (c["params"] - head) + (members * fd + 1) * num_classes
    flops = members * (c["flops"] - 2 * fd * num_classes) + 2 * members * fd * num_classes
    return {"params": params, "flops": flops, "params_M": params / 1e6, "flops_G": flops / 1e9, "macs_G": flops / 2e9}


@dataclass(frozen=True)
class Work:
    """``images`` images, each through ``passes`` passes of a network of ``fwd_flops`` forward FLOPs."""

    what: str  # e.g. "train PGD-5 + SGD", "pgd20"
    images: int
    passes: float
    fwd_flops: float

    @property
    def flops(self) -> float:
        return self.images * self.passes * self.fwd_flops


@dataclass(frozen=True)
class Stage:
    group: str  # "extractor" | "merger" | "evaluation" | "autoattack" | "curves" | "audit"
    name: str  # the run-directory key the stage writes (``extractors/eps8``), or what it is
    work: tuple[Work, ...]

    @property
    def flops(self) -> float:
        return sum(w.flops for w in self.work)


@dataclass(frozen=True)
class Throughput:
    """Sustained FLOP/s of a device kind on this code, as a range, and where the numbers come from."""

    kind: str
    low: float
    high: float
    source: str


# The one assumed throughput (the cpu row is measured at call time, `measure_cpu`).
H200 = Throughput("h200", 100e12, 180e12,
                  "ASSUMPTION until measured: bf16 eager WRN on one H200 (13-23% of the 788 TFLOP/s matmul "
                  "peak measured there); narrow nets at small batches reach less")


def attack_passes(name: str, aa_attacks: Sequence[str] = ()) -> float:
    """Passes per image of one `afs.evaluation` attack (``"pgd20"``, ``"pgd50x2"``, ``"cw20"``, ``"clean"``,
    ``"fgsm"``, ``"aa"``), scoring forward included. ``aa_attacks``: a "custom" AutoAttack's attacks; empty:
    the standard version's four."""
    kind, steps, restarts = parse_attack(name)
    if kind == "clean":
        return 1.0
    if kind == "aa":
        chosen = {a.upper() for a in aa_attacks} | {"CLEAN"}
        return sum(v for k, v in AUTOATTACK_PASSES.items() if not aa_attacks or k.upper() in chosen)
    steps = 1 if kind == "fgsm" else steps
    # Each restart: K steps, then a forward to rank it (restarts > 1); then the scoring forward.
    return restarts * FWD_BWD * steps + (restarts if restarts > 1 else 0) + 1.0


def evaluation_passes(attacks: Sequence[str], aa_attacks: Sequence[str] = ()) -> list[tuple[str, float]]:
    """``(name, passes per image)`` of one `afs.evaluation.evaluate` call: its clean forward always runs
    (attacks run on the clean-correct images; counted as if on all, an upper bound), and its single-restart
    PGDs form one chain, so PGD-10 + PGD-20 cost 20 steps (each a scoring forward more)."""
    out, done = [("clean", 1.0)], 0
    chain = sorted((a for a in attacks if parse_attack(a)[0] == "pgd" and parse_attack(a)[2] == 1),
                   key=lambda a: parse_attack(a)[1])
    for name in chain:
        steps = parse_attack(name)[1]
        out.append((name, FWD_BWD * (steps - done) + 1.0))
        done = steps
    return out + [(a, attack_passes(a, aa_attacks)) for a in attacks if a not in {n for n, _ in out}]


def stages(profile: Profile) -> list[Stage]:
    """Every stage `Pipeline.reproduce` runs for ``profile``, in its order of groups, with its work."""
    from afs.pipeline import Pipeline  # imports this module

    p, ev, ec, mc = profile, profile.evaluation, profile.extractor, profile.merger
    pipe = Pipeline(p, progress=False)  # no data and no files are touched: grid() and the paths only
    classes = 100 if p.data.name == "cifar100" else 10

    def fwd(model: ModelConfig | None = None) -> float:
        return float(network_cost(model or p.model, classes)["flops"])

    n_val = p.data.val_size
    n_train = p.data.train_size if p.data.train_size is not None else _TRAIN_IMAGES - n_val
    n_test = min(p.data.test_size or _TEST_IMAGES, _TEST_IMAGES)
    subset = {"test": n_test, **{k: min(n or n_test, n_test) for k, n in
                                 (("aa", ev.aa_size), ("curve", ev.curve_size), ("audit", ev.audit_size))}}
    out: list[Stage] = []

    # Training: the grid of `Pipeline.grid` (Table I's budgets, Table VI's ablations, every merger).
    extractors, mergers = pipe.grid()
    for budget, model in extractors:
        f = fwd(model)
        used = n_train // ec.batch_size * ec.batch_size  # the loader drops the last partial batch
        attacked = budget != 0  # budget 0 is standard training; a (lo, hi) range is attacked
        k, kv = (ec.attack_steps, ec.val_attack_steps) if attacked else (0, 0)
        out.append(Stage("extractor", pipe.key(pipe.extractor_dir(eps_from_budget(budget), model)), (
            Work(f"train PGD-{k} + SGD", ec.epochs * used, FWD_BWD * (k + 1), f),
            Work(f"val clean + PGD-{kv}", ec.epochs * n_val, 1 + (FWD_BWD * kv + 1 if attacked else 0), f))))
    for members, alpha, mode in mergers:
        f = fwd() * len(members)  # the merger head is negligible next to the members
        used, k = n_train // mc.batch_size * mc.batch_size, mc.attack_steps
        if mode == MergerMode.PAIRED:  # Eq. 5: a clean forward (alpha > 0), PGD + a forward (alpha < 1)
            per = (1.0 if alpha > 0 else 0.0) + ((FWD_BWD * k + 1) if alpha < 1 else 0.0)
        else:  # the authors' split: only the last B - floor(alpha B) images of a batch are attacked
            per = FWD_BWD * k * (1 - split_count(alpha, mc.batch_size) / mc.batch_size) + 1
        out.append(Stage("merger", pipe.key(pipe.stack_dir(members, alpha, mode)), (
            Work(f"train PGD-{k} on the stack", mc.epochs * used, per, f),
            # alpha = 1 selects on clean accuracy alone (afs.merger): no validation attack
            Work(f"val clean + PGD-{k}", mc.epochs * n_val, FWD_BWD * k + 2 if alpha < 1 else 1, f))))

    def evaluation(group: str, key: str, where: str, attacks: Sequence[str], f: float) -> Stage:
        return Stage(group, f"{key} [{where}]", tuple(Work(a, subset[where], n, f)
                                                      for a, n in evaluation_passes(attacks, ev.aa_attacks)))

    # Tables I-III and VI, and the logit ensemble: clean / PGD-10 / PGD-20 on the test subset.
    table, default, b8 = ("clean", "pgd10", "pgd20"), tuple(mc.stack), pipe.robust_budget()
    member = {b: pipe.key(pipe.extractor_dir(eps_from_budget(b))) for b in ec.budgets}
    the_stack = pipe.key(pipe.stack_dir(default, mc.alpha, mc.mode))  # what the curves and the audit attack
    stack_f = fwd() * len(default)
    out += [evaluation("evaluation", member[b], "test", table, fwd()) for b in ec.budgets]
    out += [evaluation("evaluation", pipe.key(pipe.stack_dir(*m)), "test", table, fwd() * len(m[0])) for m in mergers]
    out.append(evaluation("evaluation", pipe.key(pipe.ensemble_dir(default)), "test", table, stack_f))
    for budget, model in extractors:  # Table VI's random-budget and wide networks (Pipeline.run_ablation)
        if isinstance(budget, tuple) or model is not None:
            out.append(evaluation("evaluation", pipe.key(pipe.extractor_dir(eps_from_budget(budget), model)), "test",
                                  ("clean", "pgd20"), fwd(model)))

    # Table IV: the default stack in each merger mode and the 8/255 network, on the AutoAttack subset.
    for m in p.experiments.merger_modes:
        out.append(evaluation("autoattack", pipe.key(pipe.stack_dir(default, mc.alpha, m)), "aa",
                              ("clean", "pgd20", "aa"), stack_f))
    out.append(evaluation("autoattack", member[b8], "aa", ("clean", "pgd20", "aa"), fwd()))

    # Fig. 4a: PGD-10 at each curve budget (clean at 0) for the default stack and each of its members.
    curve = tuple("clean" if b == 0 else "pgd10" for b in ev.curve_budgets)
    for key, f in [(the_stack, stack_f), *((member[b], fwd()) for b in default)]:
        out.append(Stage("curves", f"{key} [curve]", tuple(Work(f"{a} @ {b}/255", subset["curve"], attack_passes(a), f)
                                                          for a, b in zip(curve, ev.curve_budgets))))

    # The robustness audit: stack and member under its attacks and the eps sweep, then transfer onto the stack.
    audit = [(a, a) for a in ("clean", *audit_attacks(p).values())]
    audit += [(f"pgd20 @ {b}/255", "pgd20") for b in ev.audit_budgets]  # the eps sweep (audit.run_audit)
    audit += [("pgd20_fp32", "pgd20")]  # crafted in fp32 (slower than this where bf16 is native)
    for key, f in ((the_stack, stack_f), (member[b8], fwd())):
        out.append(Stage("audit", f"{key} [audit]", tuple(Work(label, subset["audit"], attack_passes(a), f)
                                                          for label, a in audit)))
    for name, f in [*((f"#{b}", fwd()) for b in default), ("ensemble", stack_f)]:
        # PGD-20 crafted on the source, one scoring forward of the stack.
        out.append(Stage("audit", f"audit/transfer/{name.strip('#')} [audit]", (
            Work(f"pgd20 on {name}", subset["audit"], FWD_BWD * 20, f),
            Work("score on the stack", subset["audit"], 1, stack_f))))
    return out


def measure_cpu(profile: Profile, target_s: float = 2.0) -> Throughput:
    """Time PGD steps of ``profile``'s network here as the pipeline runs them (channels_last, the profile's
    precision, eval mode): the sustained FLOP/s at ``FWD_BWD`` passes a step, over about ``target_s`` seconds
    after a one-step warm-up; the batch shrinks with the network's size."""
    from afs.attacks import PGD
    from afs.runs import autocast_for, resolve_precision

    device = torch.device("cpu")
    model = build_model(profile.model, 10).to(memory_format=torch.channels_last).eval()
    f = float(network_cost(model)["flops"])
    batch = int(min(64, max(2, 2e10 // f)))  # ~20 GFLOP a batch forward: under a second a step
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long)
    with autocast_for(device, profile.precision):
        t0 = time.perf_counter()
        PGD(model, steps=1)(x, y, seed=0)  # warm-up (oneDNN primitives)
        steps = max(1, min(10, round(target_s / max(time.perf_counter() - t0, 1e-3))))
        t0 = time.perf_counter()
        PGD(model, steps=steps)(x, y, seed=0)
        took = time.perf_counter() - t0
    rate, m = batch * steps * FWD_BWD * f / took, profile.model
    return Throughput("cpu", rate, rate, f"measured now: {steps} PGD steps of {m.arch}-{m.depth}-{m.widen_factor} "
                      f"({resolve_precision(profile.precision, device)}) at batch {batch}, "
                      f"{torch.get_num_threads()} threads, {took:.1f} s "
                      "(one batch size: larger batches may run faster)")


def throughput_for(kind: str, profile: Profile) -> Throughput:
    if kind == "h200":
        return H200
    if kind == "cpu":
        return measure_cpu(profile)
    raise ValueError(f"unknown device kind {kind!r}; valid: ['cpu', 'h200']")


def _span(flops: float, t: Throughput) -> str:
    """The time at the high and the low throughput: '12-22 s', '4.1-7.4 min', '3.2 h' (one value if equal)."""
    fast, slow = flops / t.high, flops / t.low
    unit, div = ("h", 3600.0) if slow >= 7200 else ("min", 60.0) if slow >= 120 else ("s", 1.0)
    a, b = fast / div, slow / div
    fmt = (lambda v: f"{v:.1f}") if unit != "s" or b < 10 else (lambda v: f"{v:.0f}")
    return f"{fmt(a)} {unit}" if fmt(a) == fmt(b) else f"{fmt(a)}-{fmt(b)} {unit}"


def format_estimate(profile: Profile, found: list[Stage], t: Throughput) -> str:
    """The estimate as a table: one line per stage, a subtotal per group, the total."""
    lines = [f"afs reproduce --profile {profile.name} on {t.kind}: {t.low / 1e12:.3g}"
             + (f"-{t.high / 1e12:.3g}" if t.high != t.low else "") + f" TFLOP/s ({t.source})",
             f"{'stage':<58} {'images x passes':>16} {'TFLOP':>9}  time"]
    titles = {"extractor": "train extractors (Table I, Table VI ablations)",
              "merger": "train mergers (Tables II-III)",
              "evaluation": "clean / PGD-10 / PGD-20 (Tables I-III, VI, ensemble)",
              "autoattack": "AutoAttack (Table IV)", "curves": "accuracy vs eps (Fig. 4a)", "audit": "robustness audit"}
    for group, title in titles.items():
        mine = [s for s in found if s.group == group]
        if not mine:
            continue
        lines.append(title)
        for s in mine:
            ip = sum(w.images * w.passes for w in s.work)
            lines.append(f"  {s.name:<56} {ip:>16.3g} {s.flops / 1e12:>9.1f}  {_span(s.flops, t)}")
        sub = sum(s.flops for s in mine)
        lines.append(f"  {'subtotal (' + str(len(mine)) + ' stages)':<56} {'':>16} {sub / 1e12:>9.1f}  {_span(sub, t)}")
    total = sum(s.flops for s in found)
    lines.append(f"{'total':<58} {'':>16} {total / 1e12:>9.1f}  {_span(total, t)}")
    lines.append("compute only at that rate: data decoding, compiles, launch overhead and I/O come on top "
                 "(afs/cost.py)")
    return "\n".join(lines)
