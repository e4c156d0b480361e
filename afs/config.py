"""Typed, frozen configuration: one dataclass per concern, one `Profile` instance per scale.

A profile is the full recipe of a run (data, network, extractor training, merger training, evaluation,
and the experiment grid the notebooks show). It is saved as ``config.json`` beside every result, and
``Profile.from_json(p.to_json()) == p`` holds, so any result can be traced back to exactly what made it.

Budgets are written in units of 1/255 (``8`` means eps = 8/255), as in the paper's tables; the helper
`eps_from_budget` turns them into pixel-space floats.

The four profiles (see ``PROFILES``):

* ``smoke``: every code path in seconds on a CPU (CI and the notebooks' tests);
* ``cpu``: the honest laptop run on a real CIFAR-10 subset (the default without a GPU);
* ``quick``: the whole paper's pipeline on full CIFAR-10 with a fast network, on one GPU;
* ``paper``: the paper's exact settings (WRN-28-10, 70 epochs, budgets 0..9/255, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "DataConfig",
    "ModelConfig",
    "ExtractorConfig",
    "MergerConfig",
    "EvalConfig",
    "ExperimentConfig",
    "Profile",
    "PROFILES",
    "PROFILE_ENV",
    "get_profile",
    "default_profile_name",
    "eps_from_budget",
    "mask_to_budgets",
]

PROFILE_ENV = "AFS_PROFILE"
# The data sets `afs.data.load_dataset` knows (kept here so configs validate without importing torchvision).
DATASET_NAMES = ("cifar10", "cifar100", "cifar10-jpeg")
ARCHS = ("wrn", "preact_resnet18", "cnn")
LR_SCHEDULES = ("step", "onecycle")  # afs.models: WideResNet, PreActResNet18, SmallCNN


def eps_from_budget(budget: float) -> float:
    """A budget in units of 1/255 (the paper's notation) as an L-inf radius in [0, 1] pixel space."""
    return float(budget) / 255.0


def mask_to_budgets(mask: str, budgets: tuple[int, ...] = tuple(range(9))) -> tuple[int, ...]:
    """Decode the paper's binary stack masks (Table III): digit i selects network #i of ``budgets``.

    ``"000111111"`` over networks #0..#8 selects budgets 3..8, the paper's default stack. The paper prints
    its first mask with 8 digits (``"10000001"``) while the text says networks #0 and #8; a mask shorter
    than ``budgets`` is therefore an error rather than silently padded, and callers spell it in full.
    """
    if not mask or set(mask) - {"0", "1"}:
        raise ValueError(f"a stack mask is a string of 0/1 digits, got {mask!r}")
    if len(mask) != len(budgets):
        raise ValueError(
            f"stack mask {mask!r} has {len(mask)} digits but there are {len(budgets)} candidate "
            f"networks (budgets {list(budgets)}); write one digit per network"
        )
    chosen = tuple(b for b, bit in zip(budgets, mask) if bit == "1")
    if not chosen:
        raise ValueError(f"stack mask {mask!r} selects no network")
    return chosen


@dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"  # cifar10 | cifar100 | cifar10-jpeg (the offline JPEG copy of CIFAR-10)
    train_size: int | None = None  # class-balanced subset of the training set; None = all 50,000
    val_size: int = 1000  # held out of the training set for early stopping; the test set is never used
    test_size: int | None = None  # class-balanced subset of the test set for PGD; None = all 10,000
    augment: bool = True  # random crop (4-pixel zero padding) + horizontal flip, as batched tensor ops


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "wrn"  # "wrn" (WideResNet) | "preact_resnet18" | "cnn" (SmallCNN, the cpu profile's)
    depth: int = 28  # WRN depth, (depth - 4) % 6 == 0; ignored by the others
    widen_factor: int = 10  # WRN width multiplier (WRN-28-10 gives 640-d features); SmallCNN: base width / 16


@dataclass(frozen=True)
class ExtractorConfig:
    """PGD-AT of one extractor (Eq. 3-4), Section III 'Training'."""

    budgets: tuple[int, ...] = tuple(range(10))  # training budgets in 1/255 (Table I: 0..9)
    epochs: int = 70
    batch_size: int = 128
    lr: float = 0.1
    # "step": lr x gamma at lr_milestones (the paper: 0.1 -> 0.01 at epoch 60); "onecycle": linear warm-up to
    # lr over the first quarter of all batches, then linear decay (short CPU schedules; afs.runs.lr_schedule).
    lr_schedule: str = "step"
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
class MergerConfig:
    """Training of the linear merger on the frozen stack (Eq. 5)."""

    stack: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # default stack: networks #3..#8 (Section III-C)
    alpha: float = 0.5  # weight of the clean term in Eq. 5
    mode: str = "paired"  # "paired" (Eq. 5 on the same samples) | "split" (the authors' released code)
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.1
    lr_schedule: str = "step"  # as ExtractorConfig.lr_schedule
    lr_milestones: tuple[int, ...] = (3,)  # 0.1 -> 0.01 at epoch 3
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 8 / 255  # PGD against the whole stack, regenerated for every batch
    attack_steps: int = 10
    attack_step_size: float = 2 / 255


@dataclass(frozen=True)
class EvalConfig:
    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: tuple[int, ...] = (10, 20)  # PGD-10 and PGD-20
    aa_size: int | None = None  # AutoAttack on a class-balanced subset of this many test images; None = all
    aa_version: str = "standard"
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
class ExperimentConfig:
    """The grid the notebooks show beyond the default stack."""

    alphas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Table II
    # Table III masks, one digit per stacking candidate (`Profile.stack_candidates`, networks #0..#8 in
    # the paper). The paper prints its first mask with 8 digits; the text says networks #0 and #8.
    masks: tuple[str, ...] = ("100000001", "100010001", "101010101", "111111111")
    # The default stack is trained, evaluated and AutoAttacked in each of these merger modes (Table IV's
    # "paired" = Eq. 5 as written vs "split" = the authors' released code); must hold merger.mode.
    merger_modes: tuple[str, ...] = ("paired", "split")
    random_budget_range: tuple[int, int] = (3, 8)  # Table VI 'Rand. pert.': budget drawn per batch
    wide_widen_factor: int = 30  # Table VI 'Large model' (WRN-28-30)
    tsne_budgets: tuple[int, int] = (1, 8)  # Fig. 3: networks #1 and #8
    tsne_size: int = 2000  # test images embedded by t-SNE


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    experiments: ExperimentConfig = field(default_factory=ExperimentConfig)
    seed: int = 0
    # One precision for training, validation and evaluation (afs.runs.resolve_precision): "auto" = bf16
    # autocast on CUDA and fp32 elsewhere; "fp32" = fp32 everywhere (TF32 off: cuDNN would use it silently);
    # "bf16" = bf16 autocast everywhere, the CPU included (AMX / AVX512-BF16 CPUs run it several times faster).
    precision: str = "auto"
    # cuDNN/cuBLAS deterministic algorithms (slower). Off, a CUDA run repeats its data order and attack noise
    # but not the last bits of its weight gradients; the CPU path is deterministic either way.
    deterministic: bool = False
    # Run every PGD step torch.compile'd (Inductor; `afs.attacks.PGD(compile=True)`): the same attack within
    # float noise, faster on a GPU after a cold compile of 40-80 s per model and batch shape. Off by default:
    # on 2 CPU cores the compiles cost more than they save (results/bench/cpu.json, notebook 07).
    compile_attacks: bool = False
    # The `--set section.field=value` changes this profile carries against the named one, as given; its runs
    # then live in their own folder (`afs.pipeline.run_name`), never mixed with the named profile's.
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def stack_candidates(self) -> tuple[int, ...]:
        """Budgets a stack may draw from: the trained ones up to 8/255 (Section III-A drops #9)."""
        return tuple(b for b in self.extractor.budgets if b <= 8)

    def stack_for_mask(self, mask: str) -> tuple[int, ...]:
        """The budgets a Table III mask selects among `stack_candidates`."""
        return mask_to_budgets(mask, self.stack_candidates)

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The profile as JSON text; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            from afs.io import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "Profile":
        """Parse JSON text, or read it from a path."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            s = Path(s).read_text()
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> "Profile":
        """A copy with top-level fields replaced (``p.replace(merger=...)``)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, sets: Sequence[str]) -> "Profile":
        """This profile with ``section.field=value`` changes (``merger.epochs=8``, ``extractor.budgets=0,4,8``,
        ``evaluation.eps=8/255``, ``seed=1``), each checked against the dataclasses: an unknown section or
        field, or a value of the wrong type, is a ValueError naming it; the result is validated as a whole.
        The changes are recorded in ``overrides`` (so in every ``config.json`` and summary)."""
        p, sections, top, given = self, {}, {}, []
        for item in sets:
            key, sep, text = str(item).partition("=")
            section, _, name = key.strip().rpartition(".")
            if not sep or not name:
                raise ValueError(f"--set {item!r}: expected section.field=value, e.g. merger.epochs=8 or seed=1")
            if section:
                known = {f.name for f in dataclasses.fields(Profile) if dataclasses.is_dataclass(getattr(p, f.name))}
                if section not in known:
                    raise ValueError(f"--set {key}: unknown section {section!r}; sections: {sorted(known)}")
                owner = getattr(p, section)
            else:
                owner = p
            fields = {f.name for f in dataclasses.fields(owner)} - {"name", "overrides"}
            if name not in fields or dataclasses.is_dataclass(getattr(owner, name)):
                raise ValueError(f"--set {key}: {type(owner).__name__} has no field {name!r}; fields: "
                                 f"{sorted(f for f in fields if not dataclasses.is_dataclass(getattr(owner, f)))}")
            value = _parse_value(text.strip(), typing.get_type_hints(type(owner))[name], key)
            (sections.setdefault(section, {}) if section else top)[name] = value
            given.append(f"{key.strip()}={text.strip()}")
        if not given:
            return self
        # All changes at once, then one validation of the whole (a stack and its budgets may change together).
        changed = {s: dataclasses.replace(getattr(self, s), **c) for s, c in sections.items()}
        return dataclasses.replace(self, **changed, **top, overrides=(*self.overrides, *given))


def _parse_value(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of type ``hint`` (int, float incl. ``a/b``, bool, str, ``X | None``, tuples)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
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
        raise ValueError(f"--set {key}={text}: expected {_type_name(hint)} ({e})") from None
    raise ValueError(f"--set {key}: a field of type {hint} cannot be set from the command line")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _from_dict(cls: type, d: Any) -> Any:
    """Rebuild a (nested) frozen dataclass from ``asdict`` output, turning JSON lists back into tuples."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _validate(p: Profile) -> None:
    if p.data.name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {p.data.name!r}; valid: {list(DATASET_NAMES)}")
    if p.model.arch not in ARCHS:
        raise ValueError(f"unknown arch {p.model.arch!r}; valid: {list(ARCHS)}")
    if p.model.arch == "wrn" and (p.model.depth - 4) % 6 != 0:
        raise ValueError(f"WideResNet depth must satisfy (depth - 4) % 6 == 0, got {p.model.depth}")
    if not 0.0 <= p.merger.alpha <= 1.0:
        raise ValueError(f"merger alpha must lie in [0, 1], got {p.merger.alpha}")
    if p.merger.mode not in ("paired", "split"):
        raise ValueError(f"merger mode must be 'paired' or 'split', got {p.merger.mode!r}")
    modes = p.experiments.merger_modes
    if not modes or len(set(modes)) != len(modes) or set(modes) - {"paired", "split"} or p.merger.mode not in modes:
        raise ValueError(f"experiments.merger_modes must list distinct modes among 'paired'/'split', the profile's "
                         f"merger.mode {p.merger.mode!r} included; got {modes!r}")
    if not p.merger.stack:
        raise ValueError("the default stack is empty")
    missing = sorted(set(p.merger.stack) - set(p.extractor.budgets))
    if missing:
        raise ValueError(f"stack budgets {missing} are not among the trained budgets {p.extractor.budgets}")
    for name, sched in (("extractor", p.extractor.lr_schedule), ("merger", p.merger.lr_schedule)):
        if sched not in LR_SCHEDULES:
            raise ValueError(f"{name}.lr_schedule must be one of {list(LR_SCHEDULES)}, got {sched!r}")
    ratio = p.extractor.attack_step_ratio
    if ratio is not None and not ratio > 0:
        raise ValueError(f"extractor.attack_step_ratio must be > 0 (a multiple of the budget), got {ratio}")
    if (p.evaluation.aa_version == "custom") != bool(p.evaluation.aa_attacks):
        raise ValueError("evaluation.aa_attacks lists the attacks of aa_version 'custom', and only of it; got "
                         f"aa_version={p.evaluation.aa_version!r}, aa_attacks={p.evaluation.aa_attacks!r}")
    if p.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {p.precision!r}")
    for name, eps in (("merger.eps", p.merger.eps), ("evaluation.eps", p.evaluation.eps)):
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1] pixel units, got {eps}")
    for mask in p.experiments.masks:
        p.stack_for_mask(mask)  # raises on a mask of the wrong length
    if any(b < 0 for b in p.extractor.budgets):
        raise ValueError(f"training budgets must be >= 0, got {p.extractor.budgets}")


# --- the four profiles ------------------------------------------------------------------------------

# The paper, Section III 'Training' and 'Evaluation protocol', verbatim. The default dataclass values
# above *are* the paper's settings; only the data set and the AA subset are spelt out here.
PAPER = Profile(
    name="paper",
    data=DataConfig(name="cifar10", train_size=None, val_size=1000, test_size=None),
    model=ModelConfig(arch="wrn", depth=28, widen_factor=10),
    evaluation=EvalConfig(aa_size=None, batch_size=500),
)

# Every code path in about two minutes on 2 CPU cores: a tiny WRN, a few hundred real images, one epoch;
# fp32 whatever the CPU, so tests give the same numbers on every machine.
SMOKE = Profile(
    name="smoke",
    precision="fp32",
    data=DataConfig(name="cifar10-jpeg", train_size=256, val_size=64, test_size=64),
    model=ModelConfig(arch="wrn", depth=10, widen_factor=1),
    extractor=ExtractorConfig(
        budgets=(0, 4, 8), epochs=1, batch_size=64, lr=0.05, lr_milestones=(1,), attack_steps=2,
        attack_step_size=4 / 255, val_attack_steps=2,
    ),
    merger=MergerConfig(
        stack=(4, 8), epochs=1, batch_size=64, lr=0.05, lr_milestones=(1,), attack_steps=2,
        attack_step_size=4 / 255,
    ),
    evaluation=EvalConfig(aa_size=8, batch_size=64, curve_budgets=(0, 8, 16), curve_size=32, audit_size=16,
                          audit_budgets=(16, 64), audit_steps=5, audit_restarts=2),
    experiments=ExperimentConfig(
        alphas=(0.0, 1.0), masks=("101",), wide_widen_factor=2, tsne_size=64, tsne_budgets=(0, 8),
        random_budget_range=(4, 8),
    ),
)

# The honest laptop run on real CIFAR-10 in at most 30 minutes on 2 CPU cores, bf16 autocast where the CPU
# has AVX512-BF16/AMX (detected, recorded in provenance). Chosen by accuracy per minute on these cores
# (README "The cpu profile"): SmallCNN 32-32-64-64-128, 10,000 training images without augmentation (at five
# epochs crop + flip cost clean accuracy in trials), a one-cycle schedule, PGD-2 training with step
# 1.25 eps (PGD-3 was no better in trials and a quarter slower). Reduced against the paper: five budgets 0-8
# step 2, a 3-member default stack (4, 6, 8), a 2-epoch merger with PGD-2, the alpha sweep at 0 / 0.5 / 1,
# Table III's masks "ends" and "ends+middle" (networks 0+8, 0+4+8), the default stack in the paired merger mode
# only (no split-mode row), and AutoAttack as its two gradient attacks (APGD-CE + APGD-T) on 500 images: the
# standard version's FAB-T and Square would add about half an hour on these cores.
CPU = Profile(
    name="cpu",
    data=DataConfig(name="cifar10-jpeg", train_size=10000, val_size=1000, test_size=1000, augment=False),
    model=ModelConfig(arch="cnn", depth=5, widen_factor=2),
    extractor=ExtractorConfig(
        budgets=(0, 2, 4, 6, 8), epochs=5, batch_size=128, lr=0.2, lr_schedule="onecycle", attack_steps=2,
        attack_step_ratio=1.25, val_attack_steps=2,
    ),
    merger=MergerConfig(stack=(4, 6, 8), epochs=2, batch_size=128, lr=0.1, lr_schedule="onecycle", attack_steps=2,
                        attack_step_size=10 / 255),
    evaluation=EvalConfig(aa_size=500, aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"),
                          batch_size=250, curve_budgets=(0, 4, 8, 12, 16), curve_size=500, audit_size=200,
                          audit_steps=50, audit_restarts=2),
    # Table VI's large model: SmallCNN at 1.5x width (48-48-96-96-192), 2.2x the parameters of one member.
    experiments=ExperimentConfig(
        alphas=(0.0, 0.5, 1.0), masks=("10001", "10101"), merger_modes=("paired",), wide_widen_factor=3, tsne_size=500,
        tsne_budgets=(0, 8), random_budget_range=(2, 8),
    ),
)

# Full CIFAR-10 on one GPU in minutes, sized by the cost model (`afs profiles --estimate --profile quick
# --device-kind h200`, afs/cost.py): ~46 PFLOP, 4.3-7.7 min of compute at an ASSUMED 100-180 TFLOP/s (not yet
# measured). The grid is the smallest that still carries Tables I, II and IV: five budgets, alphas 0/0.5/1,
# two Table III masks, AutoAttack on 500 images (paired intervals of a few points on Table IV). WRN-16-2
# (0.20 GFLOP/forward, a 2.6 MiB checkpoint), not WRN-16-4: every finished network of the grid (26 MiB, the
# Table VI WRN-16-4 included) then fits the device tool's 64 MiB of files back and carried in, so
# `scripts/device_quick.sh` can resume in a second window; the FLOPs saved buy full data and 20 epochs.
QUICK = Profile(
    name="quick",
    data=DataConfig(name="cifar10-jpeg", train_size=None, val_size=1000, test_size=2000),
    model=ModelConfig(arch="wrn", depth=16, widen_factor=2),
    extractor=ExtractorConfig(
        budgets=(0, 2, 4, 6, 8), epochs=20, batch_size=256, lr=0.2, lr_milestones=(15,), attack_steps=5,
        val_attack_steps=5,
    ),
    merger=MergerConfig(stack=(4, 6, 8), epochs=3, batch_size=250, lr=0.1, lr_milestones=(2,), attack_steps=5),
    evaluation=EvalConfig(aa_size=500, batch_size=1000, curve_budgets=(0, 2, 4, 8, 12, 16), curve_size=1000,
                          audit_size=250, audit_steps=100, audit_restarts=2),
    # Table VI's wider network: WRN-16-4 has the parameters (2.7M) and FLOPs of the 3-member stack and a bit more.
    experiments=ExperimentConfig(
        alphas=(0.0, 0.5, 1.0), masks=("10001", "11111"), random_budget_range=(2, 8), wide_widen_factor=4,
        tsne_budgets=(0, 8), tsne_size=1000,
    ),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (SMOKE, CPU, QUICK, PAPER)}


def default_profile_name() -> str:
    """``$AFS_PROFILE`` if set, else ``quick`` when a CUDA GPU is present, else ``cpu``."""
    env = os.environ.get(PROFILE_ENV)
    if env:
        return env
    import torch

    return "quick" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``; with no name, ``default_profile_name()``. Unknown names list the valid ones."""
    name = name or default_profile_name()
    try:
        return PROFILES[name]
    except KeyError:
        source = f" (from ${PROFILE_ENV})" if os.environ.get(PROFILE_ENV) == name else ""
        raise ValueError(f"unknown profile {name!r}{source}; valid profiles: {list(PROFILES)}") from None
