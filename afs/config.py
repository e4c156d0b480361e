"""Typed, frozen configuration: one dataclass per concern, one `Profile` instance per scale.

A profile is the full recipe of a run (data, network, extractor and merger training, evaluation, the
notebooks' grid), saved as ``config.json`` beside every result; ``Profile.from_json(p.to_json()) == p``.
Budgets are in units of 1/255 (``8`` means eps = 8/255), as in the paper's tables. Profiles (``PROFILES``):
``smoke`` (every code path in seconds on a CPU), ``cpu`` (the honest laptop run on a real CIFAR-10 subset),
``quick`` (the whole pipeline on full CIFAR-10 on one GPU) and ``paper`` (the paper's exact settings).

Fields that choose a behaviour are `Choice` enums: either form (``"fp32"``, ``Precision.FP32``, any case) is
accepted and checked once, on construction; a member is its value string, so JSON and stage identities read
exactly as plain strings did.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from afs_kernels import Choice

from afs.autoattack import AAVersion
from afs.data import DatasetName
from afs.io import atomic_write_text

__all__ = ["Arch", "LRSchedule", "Precision", "MergerMode", "DataConfig", "ModelConfig", "ExtractorConfig",
           "MergerConfig", "EvalConfig", "ExperimentConfig", "Profile", "PROFILES", "PROFILE_ENV", "get_profile",
           "default_profile_name", "eps_from_budget", "mask_to_budgets"]

PROFILE_ENV = "AFS_PROFILE"


class Arch(Choice):  # afs.models.build_model
    WRN = "wrn"  # WideResNet
    PREACT_RESNET18 = "preact_resnet18"
    CNN = "cnn"  # SmallCNN, the cpu profile's


class LRSchedule(Choice):  # afs.runs.lr_schedule
    STEP = "step"  # lr x gamma at lr_milestones (the paper: 0.1 -> 0.01 at epoch 60)
    ONECYCLE = "onecycle"  # linear warm-up to lr over the first quarter of all batches, then linear decay


class Precision(Choice):  # afs.runs.resolve_precision; one for training, validation and evaluation
    AUTO = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    FP32 = "fp32"  # fp32 everywhere (TF32 off: cuDNN would use it silently)
    BF16 = "bf16"  # bf16 autocast everywhere, the CPU included (AMX / AVX512-BF16 CPUs run it several times faster)


class MergerMode(Choice):
    PAIRED = "paired"  # Eq. 5 on the same samples
    SPLIT = "split"  # the authors' code: floor(alpha*B) clean samples, the rest adversarial


def eps_from_budget(budget: float | tuple[float, float]) -> float | tuple[float, ...]:
    """A budget in units of 1/255 (the paper's notation) as an L-inf radius in [0, 1] pixel space; a (lo, hi)
    range (Table VI's random budget) as a pair of radii."""
    if isinstance(budget, tuple):
        return tuple(float(b) / 255.0 for b in budget)
    return float(budget) / 255.0


def mask_to_budgets(mask: str, budgets: tuple[int, ...] = tuple(range(9))) -> tuple[int, ...]:
    """Decode the paper's binary stack masks (Table III): digit i selects network #i of ``budgets``.

    ``"000111111"`` over networks #0..#8 selects budgets 3..8, the paper's default stack. The paper prints its
    first mask with 8 digits (``"10000001"``), the text says networks #0 and #8: a short mask is an error."""
    if not mask or set(mask) - {"0", "1"}:
        raise ValueError(f"a stack mask is a string of 0/1 digits, got {mask!r}")
    if len(mask) != len(budgets):
        raise ValueError(f"stack mask {mask!r} has {len(mask)} digits but there are {len(budgets)} candidate "
                         f"networks (budgets {list(budgets)}); write one digit per network")
    chosen = tuple(b for b, bit in zip(budgets, mask) if bit == "1")
    if not chosen:
        raise ValueError(f"stack mask {mask!r} selects no network")
    return chosen


_NOUNS = {DatasetName: "data set", Arch: "architecture", LRSchedule: "lr schedule", Precision: "precision",
          MergerMode: "merger mode", AAVersion: "AutoAttack version"}


def _choice(kind: type[Enum], value: Any, what: str) -> Any:
    """``kind(value)``, or a ValueError naming the field ``what`` and the valid values."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"unknown {_NOUNS.get(kind, kind.__name__)} {value!r} for {what}; "
                         f"valid: {[m.value for m in kind]}") from None


@functools.cache
def _enum_fields(cls: type) -> list[tuple[str, type[Enum], bool]]:
    """``(field, Enum, as a tuple[Enum, ...])`` for each field of ``cls`` that holds an Enum."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        many = typing.get_origin(hint) is tuple
        kind = typing.get_args(hint)[0] if many else hint
        if isinstance(kind, type) and issubclass(kind, Enum):
            out.append((name, kind, many))
    return out


class _Config:
    def __post_init__(self) -> None:
        """The one check of every enum field: a value of either form becomes its member."""
        for name, kind, many in _enum_fields(type(self)):
            what, value = f"{type(self).__name__}.{name}", getattr(self, name)
            object.__setattr__(self, name, tuple(_choice(kind, v, what) for v in value) if many
                               else _choice(kind, value, what))


@dataclass(frozen=True)
class DataConfig(_Config):
    name: DatasetName = DatasetName.CIFAR10
    train_size: int | None = None  # class-balanced subset of the training set; None = all 50,000
    val_size: int = 1000  # held out of the training set for early stopping; the test set is never used
    test_size: int | None = None  # class-balanced subset of the test set for PGD; None = all 10,000
    augment: bool = True  # random crop (4-pixel zero padding) + horizontal flip, as batched tensor ops


@dataclass(frozen=True)
class ModelConfig(_Config):
    arch: Arch = Arch.WRN
    depth: int = 28  # WRN depth, (depth - 4) % 6 == 0; ignored by the others
    widen_factor: int = 10  # WRN width multiplier (WRN-28-10 gives 640-d features); SmallCNN: base width / 16


@dataclass(frozen=True)
class ExtractorConfig(_Config):
    """PGD-AT of one extractor (Eq. 3-4), Section III 'Training'."""

    budgets: tuple[int, ...] = tuple(range(10))  # training budgets in 1/255 (Table I: 0..9)
    epochs: int = 70
    batch_size: int = 128
    lr: float = 0.1
    lr_schedule: LRSchedule = LRSchedule.STEP
    lr_milestones: tuple[int, ...] = (60,)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    attack_steps: int = 10  # PGD-10 inner maximisation
    attack_step_size: float = 2 / 255
    # If set, the PGD step is this multiple of the network's own budget instead (Madry et al.: 2.5 / steps,
    # so the steps can cross the ball); attack_step_size is then unused.
    attack_step_ratio: float | None = None
    # Early stopping (Rice et al. 2020): keep the epoch with the best validation PGD accuracy.
    early_stopping: bool = True
    val_attack_steps: int = 10


@dataclass(frozen=True)
class MergerConfig(_Config):
    """Training of the linear merger on the frozen stack (Eq. 5)."""

    stack: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # default stack: networks #3..#8 (Section III-C)
    alpha: float = 0.5  # weight of the clean term in Eq. 5
    mode: MergerMode = MergerMode.PAIRED
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.1
    lr_schedule: LRSchedule = LRSchedule.STEP
    lr_milestones: tuple[int, ...] = (3,)  # 0.1 -> 0.01 at epoch 3
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 8 / 255  # PGD against the whole stack, regenerated for every batch
    attack_steps: int = 10
    attack_step_size: float = 2 / 255


@dataclass(frozen=True)
class EvalConfig(_Config):
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: tuple[int, ...] = (10, 20)  # PGD-10 and PGD-20
    aa_size: int | None = None  # AutoAttack on a class-balanced subset of this many test images; None = all
    aa_version: AAVersion = AAVersion.STANDARD
    # With aa_version "custom": the AutoAttack attacks to run, e.g. ("apgd-ce", "apgd-t"): AutoAttack's two
    # gradient attacks without FAB-T and Square (the cpu profile's reduction, said wherever it is reported).
    aa_attacks: tuple[str, ...] = ()
    batch_size: int = 500
    curve_budgets: tuple[int, ...] = (0, 2, 4, 6, 8, 10, 12, 14, 16)  # Fig. 4a x-axis, in 1/255
    curve_size: int | None = None  # test images per point of the Fig. 4a curves; None = the PGD test set
    # The robustness audit (`afs.audit.run_audit`, notebook 08): on its own class-balanced test subset, the
    # default stack and its most robust member under PGD-20 at these larger budgets (in 1/255, step eps/4),
    # PGD with more steps and restarts, a margin-loss PGD-20, and transfer attacks from the members.
    audit_size: int | None = 1000  # None = the PGD test set
    audit_budgets: tuple[int, ...] = (16, 32, 64)  # must reach 64/255, where accuracy must be about 0
    audit_steps: int = 100  # the "more steps" PGD ...
    audit_restarts: int = 5  # ... with this many random restarts (worst case per image kept)


@dataclass(frozen=True)
class ExperimentConfig(_Config):
    """The grid the notebooks show beyond the default stack."""

    alphas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Table II
    # Table III masks, one digit per stacking candidate (`Profile.stack_candidates`, networks #0..#8).
    masks: tuple[str, ...] = ("100000001", "100010001", "101010101", "111111111")
    # The default stack is trained, evaluated and AutoAttacked in each of these merger modes (Table IV's
    # "paired" = Eq. 5 as written vs "split" = the authors' released code); must hold merger.mode.
    merger_modes: tuple[MergerMode, ...] = (MergerMode.PAIRED, MergerMode.SPLIT)
    random_budget_range: tuple[int, int] = (3, 8)  # Table VI 'Rand. pert.': budget drawn per batch
    wide_widen_factor: int = 30  # Table VI 'Large model' (WRN-28-30)
    tsne_budgets: tuple[int, int] = (1, 8)  # Fig. 3: networks #1 and #8
    tsne_size: int = 2000  # test images embedded by t-SNE


@dataclass(frozen=True)
class Profile(_Config):
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    experiments: ExperimentConfig = field(default_factory=ExperimentConfig)
    seed: int = 0
    precision: Precision = Precision.AUTO
    # cuDNN/cuBLAS deterministic algorithms (slower). Off, a CUDA run repeats its data order and attack noise
    # but not the last bits of its weight gradients; the CPU path is deterministic either way.
    deterministic: bool = False
    # Run every PGD step torch.compile'd (`afs.attacks.PGD(compile=True)`): the same attack within float noise,
    # faster on a GPU after a cold compile of 40-80 s per model and batch shape; on 2 CPU cores the compiles
    # cost more than they save (results/bench/cpu.json, notebook 07).
    compile_attacks: bool = False
    # The `--set section.field=value` changes this profile carries against the named one, as given; its runs
    # then live in their own folder (`afs.pipeline.run_name`), never mixed with the named profile's.
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate(self)

    @property
    def stack_candidates(self) -> tuple[int, ...]:
        """Budgets a stack may draw from: the trained ones up to 8/255 (Section III-A drops #9)."""
        return tuple(b for b in self.extractor.budgets if b <= 8)

    def stack_for_mask(self, mask: str) -> tuple[int, ...]:
        """The budgets a Table III mask selects among `stack_candidates`."""
        return mask_to_budgets(mask, self.stack_candidates)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The profile as JSON text; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Profile":
        """Parse JSON text, or read it from a path."""
        s = str(text_or_path)
        return cls.from_dict(json.loads(s if s.lstrip().startswith("{") else Path(s).read_text()))

    def replace(self, **changes: Any) -> "Profile":
        """A copy with top-level fields replaced (``p.replace(merger=...)``)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, sets: Sequence[str]) -> "Profile":
        """This profile with ``section.field=value`` changes (``merger.epochs=8``, ``extractor.budgets=0,4,8``,
        ``evaluation.eps=8/255``, ``seed=1``), each checked against the dataclasses: an unknown section or
        field, or a value of the wrong type, is a ValueError naming it; the result is validated as a whole.
        The changes are recorded in ``overrides`` (so in every ``config.json`` and summary)."""
        sections: dict[str, dict[str, Any]] = {}
        given = []
        for item in sets:
            key, sep, text = str(item).partition("=")
            section, _, name = key.strip().rpartition(".")
            if not sep or not name:
                raise ValueError(f"--set {item!r}: expected section.field=value, e.g. merger.epochs=8 or seed=1")
            known = [f.name for f in dataclasses.fields(Profile) if dataclasses.is_dataclass(getattr(self, f.name))]
            if section and section not in known:
                raise ValueError(f"--set {key}: unknown section {section!r}; sections: {sorted(known)}")
            owner = getattr(self, section) if section else self
            fields = sorted({f.name for f in dataclasses.fields(owner)} - {"name", "overrides", *known})
            if name not in fields:
                raise ValueError(f"--set {key}: {type(owner).__name__} has no field {name!r}; fields: {fields}")
            hint = typing.get_type_hints(type(owner))[name]
            sections.setdefault(section, {})[name] = _parse_value(text.strip(), hint, key)
            given.append(f"{key.strip()}={text.strip()}")
        if not given:
            return self
        # All changes at once, then one validation of the whole (a stack and its budgets may change together).
        top = sections.pop("", {})
        changed = {s: dataclasses.replace(getattr(self, s), **c) for s, c in sections.items()}
        return dataclasses.replace(self, **changed, **top, overrides=(*self.overrides, *given))


def _parse_value(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float incl. ``a/b``, bool, str, an Enum, ``X | None``,
    tuples)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return _choice(hint, text, key)
    try:
        if typing.get_origin(hint) is tuple:
            items = [t.strip() for t in text.split(",") if t.strip()]
            types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(types) != len(items):
                raise ValueError(f"{len(types)} comma-separated values")
            return tuple(_parse_value(t, h, key) for t, h in zip(items, types))
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("true or false")
            return text.lower() in ("true", "1", "yes")
        if hint is int:
            return int(text)
        if hint is float:
            num, sep, den = text.partition("/")
            return float(num) / float(den) if sep else float(text)
        if hint is str:
            return text
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"--set {key}={text}: expected {getattr(hint, '__name__', hint)} ({e})") from None
    raise ValueError(f"--set {key}: a field of type {hint} cannot be set from the command line")


def _from_dict(cls: type, d: Any) -> Any:
    """Rebuild a (nested) frozen dataclass from ``asdict`` output, turning JSON lists back into tuples."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    hints, names = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    if set(d) - names:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(set(d) - names)}; valid: {sorted(names)}")
    return cls(**{k: _from_dict(hints[k], v) if dataclasses.is_dataclass(hints[k])
                  else tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _validate(p: Profile) -> None:
    """What the fields' types cannot say (the enums checked themselves on construction)."""
    if p.model.arch == Arch.WRN and (p.model.depth - 4) % 6 != 0:
        raise ValueError(f"WideResNet depth must satisfy (depth - 4) % 6 == 0, got {p.model.depth}")
    if not 0.0 <= p.merger.alpha <= 1.0:
        raise ValueError(f"merger alpha must lie in [0, 1], got {p.merger.alpha}")
    modes = p.experiments.merger_modes
    if not modes or len(set(modes)) != len(modes) or p.merger.mode not in modes:
        raise ValueError(f"experiments.merger_modes must list distinct merger modes, the profile's merger.mode "
                         f"{p.merger.mode.value!r} included; got {[m.value for m in modes]}")
    if not p.merger.stack:
        raise ValueError("the default stack is empty")
    missing = sorted(set(p.merger.stack) - set(p.extractor.budgets))
    if missing:
        raise ValueError(f"stack budgets {missing} are not among the trained budgets {p.extractor.budgets}")
    ratio = p.extractor.attack_step_ratio
    if ratio is not None and not ratio > 0:
        raise ValueError(f"extractor.attack_step_ratio must be > 0 (a multiple of the budget), got {ratio}")
    if (p.evaluation.aa_version == AAVersion.CUSTOM) != bool(p.evaluation.aa_attacks):
        raise ValueError("evaluation.aa_attacks lists the attacks of aa_version 'custom', and only of it; got "
                         f"aa_version={p.evaluation.aa_version.value!r}, aa_attacks={p.evaluation.aa_attacks!r}")
    for name, eps in (("merger.eps", p.merger.eps), ("evaluation.eps", p.evaluation.eps)):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1] pixel units, got {eps}")
    for mask in p.experiments.masks:
        p.stack_for_mask(mask)  # raises on a mask of the wrong length
    if any(b < 0 for b in p.extractor.budgets):
        raise ValueError(f"training budgets must be >= 0, got {p.extractor.budgets}")


# The paper, Section III 'Training' and 'Evaluation protocol': the dataclasses' defaults.
PAPER = Profile(name="paper")

# Every code path in about two minutes on 2 CPU cores: a tiny WRN, a few hundred real images, one epoch;
# fp32 whatever the CPU, so tests give the same numbers on every machine.
SMOKE = Profile(
    name="smoke", precision="fp32",
    data=DataConfig(name="cifar10-jpeg", train_size=256, val_size=64, test_size=64),
    model=ModelConfig(arch="wrn", depth=10, widen_factor=1),
    extractor=ExtractorConfig(budgets=(0, 4, 8), epochs=1, batch_size=64, lr=0.05, lr_milestones=(1,), attack_steps=2,
                              attack_step_size=4 / 255, val_attack_steps=2),
    merger=MergerConfig(stack=(4, 8), epochs=1, batch_size=64, lr=0.05, lr_milestones=(1,), attack_steps=2,
                        attack_step_size=4 / 255),
    evaluation=EvalConfig(aa_size=8, batch_size=64, curve_budgets=(0, 8, 16), curve_size=32, audit_size=16,
                          audit_budgets=(16, 64), audit_steps=5, audit_restarts=2),
    experiments=ExperimentConfig(alphas=(0.0, 1.0), masks=("101",), wide_widen_factor=2, tsne_size=64,
                                 tsne_budgets=(0, 8), random_budget_range=(4, 8)),
)

# The honest laptop run on real CIFAR-10 in at most 30 minutes on 2 CPU cores (bf16 where the CPU has
# AVX512-BF16/AMX), chosen by accuracy per minute there (README "The cpu profile"): SmallCNN 32-32-64-64-128,
# 10,000 images without augmentation (crop + flip cost clean accuracy at five epochs), one-cycle, PGD-2 at step
# 1.25 eps (PGD-3 no better, a quarter slower). Reduced: budgets 0-8 step 2, stack (4, 6, 8), alphas 0/0.5/1,
# masks 0+8 and 0+4+8, paired mode only, AutoAttack as APGD-CE + APGD-T on 500 images (FAB-T and Square would
# add about half an hour).
CPU = Profile(
    name="cpu",
    data=DataConfig(name="cifar10-jpeg", train_size=10000, val_size=1000, test_size=1000, augment=False),
    model=ModelConfig(arch="cnn", depth=5, widen_factor=2),
    extractor=ExtractorConfig(budgets=(0, 2, 4, 6, 8), epochs=5, batch_size=128, lr=0.2, lr_schedule="onecycle",
                              attack_steps=2, attack_step_ratio=1.25, val_attack_steps=2),
    merger=MergerConfig(stack=(4, 6, 8), epochs=2, batch_size=128, lr=0.1, lr_schedule="onecycle", attack_steps=2,
                        attack_step_size=10 / 255),
    evaluation=EvalConfig(aa_size=500, aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"),
                          batch_size=250, curve_budgets=(0, 4, 8, 12, 16), curve_size=500, audit_size=200,
                          audit_steps=50, audit_restarts=2),
    # Table VI's large model: SmallCNN at 1.5x width (48-48-96-96-192), 2.2x the parameters of one member.
    experiments=ExperimentConfig(alphas=(0.0, 0.5, 1.0), masks=("10001", "10101"), merger_modes=("paired",),
                                 wide_widen_factor=3, tsne_size=500, tsne_budgets=(0, 8), random_budget_range=(2, 8)),
)

# Full CIFAR-10 on one GPU in minutes, sized by the cost model (`afs profiles --estimate --profile quick
# --device-kind h200`): ~46 PFLOP, 4.3-7.7 min at an ASSUMED 100-180 TFLOP/s. The smallest grid that carries
# Tables I, II and IV. WRN-16-2 (0.20 GFLOP, a 2.6 MiB checkpoint), not WRN-16-4: the grid's networks (26 MiB)
# then fit the device tool's 64 MiB, so `scripts/device_quick.sh` can resume in a second window.
QUICK = Profile(
    name="quick",
    data=DataConfig(name="cifar10-jpeg", train_size=None, val_size=1000, test_size=2000),
    model=ModelConfig(arch="wrn", depth=16, widen_factor=2),
    extractor=ExtractorConfig(budgets=(0, 2, 4, 6, 8), epochs=20, batch_size=256, lr=0.2, lr_milestones=(15,),
                              attack_steps=5, val_attack_steps=5),
    merger=MergerConfig(stack=(4, 6, 8), epochs=3, batch_size=250, lr=0.1, lr_milestones=(2,), attack_steps=5),
    evaluation=EvalConfig(aa_size=500, batch_size=1000, curve_budgets=(0, 2, 4, 8, 12, 16), curve_size=1000,
                          audit_size=250, audit_steps=100, audit_restarts=2),
    # Table VI's wider network: WRN-16-4 has the parameters (2.7M) and FLOPs of the 3-member stack and a bit more.
    experiments=ExperimentConfig(alphas=(0.0, 0.5, 1.0), masks=("10001", "11111"), random_budget_range=(2, 8),
                                 wide_widen_factor=4, tsne_budgets=(0, 8), tsne_size=1000),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (SMOKE, CPU, QUICK, PAPER)}


def default_profile_name() -> str:
    """``$AFS_PROFILE`` if set, else ``quick`` when a CUDA GPU is present, else ``cpu``."""
    import torch

    return os.environ.get(PROFILE_ENV) or ("quick" if torch.cuda.is_available() else "cpu")


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``; with no name, ``default_profile_name()``. Unknown names list the valid ones."""
    name = name or default_profile_name()
    try:
        return PROFILES[name]
    except KeyError:
        source = f" (from ${PROFILE_ENV})" if os.environ.get(PROFILE_ENV) == name else ""
        raise ValueError(f"unknown profile {name!r}{source}; valid profiles: {list(PROFILES)}") from None
