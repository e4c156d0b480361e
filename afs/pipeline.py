"""The paper's experiments as one resumable pipeline over a run directory (``afs reproduce``).

Every artifact has a fixed place under ``<out>/<profile>/``; a finished stage is reused, an interrupted one
resumes, so the notebooks and the CLI share artifacts and any notebook can run alone::

    extractors/eps8/                 one PGD-AT network (Table I); eps3-8/ the random-budget ablation,
                                     wrn-28-30-eps8/ the wider-network ablation (Table VI)
    stacks/3-4-5-6-7-8_a0.5_paired/  one merger (Tables II-IV)
    <any of these>/eval_test.json    test-set accuracies; eval_test.pt the per-sample correctness
    summary.json                     everything the notebooks and README tables read

Table/figure map: Table I `extractors`, Table II `alpha_sweep`, Table III `masks`, Table IV `comparison`
(AutoAttack), Table VI `ablation`, Fig. 4a `curves`, Fig. 4b `stacks[*].importance_ratio`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from afs import audit, cost, progress
from afs.autoattack import AutoAttackWarning
from afs.config import MergerMode, ModelConfig, Profile, eps_from_budget
from afs.data import ImageData, balanced_subset, load_dataset, train_val_split
from afs.distributed import barrier, is_main
from afs.evaluation import PROTOCOL as EVAL_PROTOCOL
from afs.evaluation import evaluate, trade_off
from afs.io import atomic_torch_save, atomic_write_json, derive_seed, load_torch, manifest, read_json, state_hash
from afs.merger import train_merger
from afs.stacking import LogitEnsemble, StackedModel
from afs.summary import SUMMARY_VERSION, collect_samples, merger_training, validate_summary
from afs.runs import RunDir, configure_numerics
from afs.training import TrainData, budget_name, train_extractor

__all__ = ["ProfileData", "load_profile_data", "Pipeline", "stack_name", "run_name"]


@dataclass(frozen=True)
class ProfileData:
    """The profile's slices of the data set: train/val (from the training set) and test."""

    train: TrainData
    test: ImageData  # the class-balanced test subset used for clean/PGD numbers
    aa_index: torch.Tensor  # indices into `test` of the AutoAttack subset (class-balanced, fixed)
    curve_index: torch.Tensor  # indices into `test` of the Fig. 4a subset
    audit_index: torch.Tensor  # indices into `test` of the robustness-audit subset

    def describe(self) -> dict[str, Any]:
        """Subset sizes and a short content hash of each subset's test indices (which images, in which
        order), so a summary names exactly the images its numbers were measured on."""
        return {"name": self.test.name, "train": len(self.train.train), "val": len(self.train.val),
                "test": len(self.test), "aa": len(self.aa_index), "curve": len(self.curve_index),
                "audit": len(self.audit_index), "classes": list(self.test.classes),
                "subset_sha": {k: _index_hash(v) for k, v in self.subsets().items()}}

    def subsets(self) -> dict[str, torch.Tensor]:
        """Each evaluation subset as indices into the profile's test subset ("test" is all of it)."""
        return {"test": torch.arange(len(self.test)), "aa": self.aa_index, "curve": self.curve_index,
                "audit": self.audit_index}


def _index_hash(index: torch.Tensor) -> str:
    return hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def load_profile_data(profile: Profile, root: str | Path | None = None) -> ProfileData:
    """Load the profile's data set and carve its deterministic subsets (seeded by ``profile.seed``)."""
    dc, seed = profile.data, profile.seed
    full_train = load_dataset(dc.name, root, "train")
    full_test = load_dataset(dc.name, root, "test")
    want = None if dc.train_size is None else dc.train_size + dc.val_size
    pool = full_train.subset(balanced_subset(full_train.labels, want, seed=seed))
    tr, va = train_val_split(pool.labels, dc.val_size, seed=seed)
    test = full_test.subset(balanced_subset(full_test.labels, dc.test_size, seed=seed))
    ev = profile.evaluation
    aa = balanced_subset(test.labels, ev.aa_size, seed=derive_seed("aa", seed))
    curve = balanced_subset(test.labels, ev.curve_size, seed=derive_seed("curve", seed))
    audit = balanced_subset(test.labels, ev.audit_size, seed=derive_seed("audit", seed))
    return ProfileData(TrainData(pool.subset(tr), pool.subset(va)), test, aa, curve, audit)


def stack_name(budgets: Sequence[int], alpha: float, mode: str) -> str:
    return f"{'-'.join(str(b) for b in budgets)}_a{alpha:g}_{MergerMode(mode).value}"


class Pipeline:
    """Trains and evaluates what a profile's experiments need, reusing whatever the run directory holds.

    Several processes may share the run directory (two `afs reproduce` calls, `afs.grid`'s jobs): each stage
    is trained or evaluated under its lock by one of them (a second waits, told who holds it), and the others
    then find it finished."""

    def __init__(self, profile: Profile, out: str | Path = "runs", data_root: str | Path | None = None,
                 device: torch.device | str | None = None, progress: bool = True) -> None:
        self.profile = profile
        self.root = Path(out) / run_name(profile)
        self.data_root = data_root
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        # One precision policy (training, validation, evaluation) and explicit TF32/determinism flags.
        self.numerics = configure_numerics(profile.precision, profile.deterministic, self.device)
        self._data: ProfileData | None = None
        self._models: dict[str, nn.Module] = {}
        self._hashes: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self.timings: dict[str, float] = {}
        self.reused: set[str] = set()  # stages (and evaluations) found finished on disk, not computed here

    # --- data and trained artifacts ---------------------------------------------------------------
    @property
    def data(self) -> ProfileData:
        if self._data is None:
            self._data = load_profile_data(self.profile, self.data_root)
        return self._data

    def extractor_dir(self, eps: float | tuple[float, float], model_config: ModelConfig | None = None) -> Path:
        name = budget_name(eps)
        if model_config is not None and model_config != self.profile.model:
            name = f"{model_config.arch}-{model_config.depth}-{model_config.widen_factor}-{name}"
        return self.root / "extractors" / name

    def extractor(self, budget: int | tuple[int, int], model_config: ModelConfig | None = None) -> nn.Module:
        """The network PGD-trained at ``budget``/255 (a (lo, hi) pair: random budget per batch)."""
        eps = eps_from_budget(budget)
        d = self.extractor_dir(eps, model_config)
        return self._trained(d, "train", lambda: train_extractor(
            self.profile, self.data.train, eps, run_dir=d, device=self.device, model_config=model_config,
            progress=self.progress))

    def stack_dir(self, budgets: Sequence[int], alpha: float, mode: str) -> Path:
        return self.root / "stacks" / stack_name(budgets, alpha, mode)

    def stack(self, budgets: Sequence[int], alpha: float | None = None, mode: str | None = None) -> StackedModel:
        """The stack of the extractors at ``budgets`` with a merger trained at (alpha, mode) (Eq. 5)."""
        mc = self.profile.merger
        alpha = mc.alpha if alpha is None else alpha
        mode = mc.mode if mode is None else MergerMode(mode).value
        d = self.stack_dir(budgets, alpha, mode)
        if str(d) in self._models:
            return self._models[str(d)]
        # The members first (each under its own lock), then the merger's initial weights.
        stack = StackedModel([self.extractor(b) for b in budgets], len(self.data.test.classes),
                             budgets=tuple(budgets)).to(self.device)
        return self._trained(d, "merger", lambda: train_merger(
            stack, self.profile, self.data.train, alpha, mode, run_dir=d, device=self.device, progress=self.progress))

    def _trained(self, d: Path, what: str, train: Callable[[], Any]) -> Any:
        """Stage ``d``'s model, trained, resumed or loaded once per Pipeline under the stage's lock."""
        if str(d) not in self._models:
            if (d / "metrics.json").is_file():
                self.reused.add(self.key(d))
            t0 = progress.begin("train", self.key(d))  # the terminal's stage lines (afs reproduce)
            with RunDir(d).lock():
                self._models[str(d)] = train()
            self._time(f"{what} {d.name}", t0)
        return self._models[str(d)]

    def ensemble(self, budgets: Sequence[int]) -> LogitEnsemble:
        return LogitEnsemble([self.extractor(b) for b in budgets], budgets=tuple(budgets))

    # --- evaluation, cached per artifact ----------------------------------------------------------
    def evaluate(self, model: nn.Module, where: Path, attacks: Iterable[str], subset: str = "test") -> dict[str, float]:
        """Accuracies (percent) of ``model`` on the test subset named by ``subset`` ("test" or "aa"),
        reusing ``where/eval_<subset>.json``; per-sample correctness goes to ``where/eval_<subset>.pt``.
        Under a process group (``torchrun ... afs evaluate``) `afs.evaluation.evaluate` shards the images
        over the ranks and rank 0 writes the files."""
        ev, attacks = self.profile.evaluation, list(attacks)
        jpath, spath = where / f"eval_{subset}.json", where / f"eval_{subset}.pt"
        with RunDir(where).lock():
            setting = self._setting(model, subset, eps=ev.eps, step_size=ev.step_size, aa_version=ev.aa_version,
                                    aa_attacks=list(ev.aa_attacks))
            done = read_json(jpath) if jpath.is_file() else {}
            if done.get("setting") != setting or not spath.is_file():
                # Another model (retrained: other weights), other images, attack settings, seed, batching or
                # protocol: nothing of the old files is this evaluation's, so it starts over.
                done = {"setting": setting, "accuracy": {}}
                (where / f"aa_state_{subset}.json").unlink(missing_ok=True)  # AutoAttack's resume state: the old one's
            kept = bool(done["accuracy"])  # attacks already evaluated under this very setting
            missing = [a for a in attacks if a not in done["accuracy"]]
            if not missing:
                self.reused.add(f"{self.key(where)} [{subset}]")
                return {a: done["accuracy"][a] for a in attacks}
            x, y = self._subset(subset)
            t0 = progress.begin("eval", f"{self.key(where)} [{subset}]", missing)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", AutoAttackWarning)
                res = evaluate(model, x, y, attacks=missing, eps=ev.eps, step_size=ev.step_size,
                               batch_size=ev.batch_size, seed=self.profile.seed, device=self.device,
                               progress=self.progress, craft_precision=self.craft_precision,
                               compile=self.profile.compile_attacks,
                               aa_kwargs={"version": ev.aa_version, "attacks": list(ev.aa_attacks) or None,
                                          "state_path": where / f"aa_state_{subset}.json"})
            for w in caught:  # AutoAttack's own checks (checks.py): kept for the audit, and shown as usual
                if issubclass(w.category, AutoAttackWarning):
                    done.setdefault("aa_flags", []).append(str(w.message))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self._time(f"eval {where.name} {missing}", t0)
            done["accuracy"].update(res.accuracy)
            done["n"] = res.n
            if is_main():
                samples = load_torch(spath) if kept else {}
                samples.update({k: v.cpu() for k, v in res.correct.items()})
                atomic_torch_save(samples, spath)
                atomic_write_json(jpath, done)
            barrier()
            return {a: done["accuracy"][a] for a in attacks}

    def _setting(self, model: nn.Module, subset: str, **extra: Any) -> dict[str, Any]:
        """What a cached evaluation was made from: the model by the content hash of its weights, the images
        (hash of their indices), the evaluation protocol, the seed and batching (each batch's starts derive
        from them) and the precision, plus the attack's own settings. A cache is reused only on a match."""
        h = self._hashes.get(model)
        if h is None:
            h = self._hashes[model] = state_hash(model)
        return {"model": h, "images": _index_hash(self.data.subsets()[subset]), "protocol": EVAL_PROTOCOL,
                "seed": self.profile.seed, "batch_size": self.profile.evaluation.batch_size,
                "precision": self.numerics["precision"], "compile_attacks": self.profile.compile_attacks, **extra}

    @property
    def craft_precision(self) -> str:
        """The precision attacks are crafted under (accuracies are scored in fp32, `afs.evaluation.evaluate`)."""
        return self.numerics["precision"]

    def samples(self, where: Path, subset: str = "test") -> dict[str, torch.Tensor]:
        """Per-sample correctness (bool [n] per attack) saved by `evaluate` in ``where/eval_<subset>.pt``."""
        path = where / f"eval_{subset}.pt"
        return load_torch(path) if path.is_file() else {}

    def aa_flags(self, where: Path, subset: str = "aa") -> list[str]:
        """AutoAttack's own warnings recorded when ``where`` was evaluated with it (empty: none raised)."""
        path = where / f"eval_{subset}.json"
        return list(read_json(path).get("aa_flags", [])) if path.is_file() else []

    def _subset(self, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.data.subsets()[subset]
        return self.data.test.images[idx], self.data.test.labels[idx]

    def curve(self, model: nn.Module, where: Path) -> list[float]:
        """PGD-10 accuracy at each of the profile's ``curve_budgets`` (Fig. 4a), on the curve subset."""
        ev = self.profile.evaluation
        path, spath = where / "eval_curve.json", where / "eval_curve.pt"
        with RunDir(where).lock():
            key = self._setting(model, "curve", budgets=list(ev.curve_budgets), step_size=ev.step_size)
            if path.is_file() and spath.is_file() and read_json(path).get("setting") == key:
                self.reused.add(f"{self.key(where)} [curve]")
                return read_json(path)["accuracy"]
            x, y = self._subset("curve")
            t0 = progress.begin("eval", f"{self.key(where)} [curve]")
            acc, flags = [], {}
            for b in ev.curve_budgets:
                name = "clean" if b == 0 else "pgd10"
                res = evaluate(model, x, y, attacks=(name,), eps=eps_from_budget(b), step_size=ev.step_size,
                               batch_size=ev.batch_size, seed=self.profile.seed, device=self.device, progress=False,
                               craft_precision=self.craft_precision, compile=self.profile.compile_attacks)
                acc.append(res.accuracy[name])
                flags[f"eps{b}"] = res.correct[name]
            self._time(f"curve {where.name}", t0)
            atomic_torch_save(flags, spath)
            atomic_write_json(path, {"setting": key, "accuracy": acc})
            return acc

    def _time(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.time() - t0, 1)
        progress.end()

    # --- the experiments --------------------------------------------------------------------------
    def key(self, d: Path) -> str:
        """A stage's name in a summary: its directory relative to the run root ("extractors/eps8")."""
        return str(d.relative_to(self.root))

    def robust_budget(self) -> int:
        """The paper's PGD-AT baseline and most robust stacking candidate: #8, else the largest budget."""
        budgets = self.profile.extractor.budgets
        return 8 if 8 in budgets else max(budgets)

    def wide_model(self) -> ModelConfig:
        """Table VI's 'Large model': the profile's network at ``experiments.wide_widen_factor``."""
        m = self.profile.model
        return ModelConfig(m.arch, m.depth, self.profile.experiments.wide_widen_factor)

    def ensemble_dir(self, budgets: Sequence[int]) -> Path:
        return self.root / "ensembles" / "-".join(map(str, budgets))

    def grid(self) -> tuple[list[tuple[int | tuple[int, int], ModelConfig | None]],
                            list[tuple[tuple[int, ...], float, str]]]:
        """Every training stage `reproduce` needs: extractors as (budget, model config or None), then
        mergers as (members, alpha, mode); mergers need their extractors, so they come second."""
        p, default = self.profile, tuple(self.profile.merger.stack)
        extractors: list[tuple[int | tuple[int, int], ModelConfig | None]] = [(b, None) for b in p.extractor.budgets]
        extractors += [(tuple(p.experiments.random_budget_range), None), (self.robust_budget(), self.wide_model())]
        stacks = [(default, p.merger.alpha, m) for m in p.experiments.merger_modes]
        stacks += [(default, a, "paired") for a in p.experiments.alphas]
        stacks += [(tuple(p.stack_for_mask(m)), p.merger.alpha, "paired") for m in p.experiments.masks]
        return extractors, list(dict.fromkeys(stacks))  # de-duplicated, order kept

    def run_extractors(self) -> dict[str, dict[str, Any]]:
        """Table I: every budget's network on clean / PGD-10 / PGD-20."""
        out = {}
        for b in self.profile.extractor.budgets:
            model, d = self.extractor(b), self.extractor_dir(eps_from_budget(b))
            out[str(b)] = {"key": self.key(d), **self.evaluate(model, d, ("clean", "pgd10", "pgd20")),
                           "best_epoch": read_json(d / "metrics.json")["best_epoch"]}
        return out

    def stack_record(self, budgets: Sequence[int], alpha: float, mode: str, aa: bool = False) -> dict[str, Any]:
        stack, d = self.stack(budgets, alpha, mode), self.stack_dir(budgets, alpha, mode)
        rec: dict[str, Any] = {"name": d.name, "key": self.key(d), "members": list(budgets), "alpha": alpha,
                               "mode": mode, **self.evaluate(stack, d, ("clean", "pgd10", "pgd20")),
                               "importance_ratio": stack.importance_ratio().tolist(), "training": merger_training(d)}
        if aa:
            # Table IV's rows: clean, PGD-20 and AutoAttack all on the AutoAttack subset (one set of images).
            on_aa = self.evaluate(stack, d, ("clean", "pgd20", "aa"), subset="aa")
            rec["aa"], rec["aa_clean"], rec["aa_pgd20"] = on_aa["aa"], on_aa["clean"], on_aa["pgd20"]
        return rec

    def reproduce(self, write: bool = True) -> dict[str, Any]:
        """Every stage the notebooks need; returns (and writes) ``summary.json``."""
        p, t_start = self.profile, time.time()
        default = tuple(p.merger.stack)
        summary: dict[str, Any] = {"version": SUMMARY_VERSION, "profile": p.name, "config": p.to_dict(),
                                   "dataset": self.data.describe(),
                                   "provenance": {**manifest(self.device), "numerics": self.numerics}}
        summary["extractors"] = self.run_extractors()

        # The default stack in each merger mode (AutoAttack on each), the alpha sweep, the stacking sets.
        stacks: dict[str, dict[str, Any]] = {}

        def add(budgets: Sequence[int], alpha: float, mode: str, tag: str, aa: bool = False) -> None:
            name = stack_name(budgets, alpha, mode)
            if name not in stacks or (aa and "aa" not in stacks[name]):
                tags = stacks.get(name, {}).get("tags", [])
                stacks[name] = {**self.stack_record(budgets, alpha, mode, aa=aa), "tags": tags}
            stacks[name]["tags"].append(tag)

        for mode in p.experiments.merger_modes:
            add(default, p.merger.alpha, mode, f"default-{mode}", aa=True)
        for a in p.experiments.alphas:
            add(default, a, "paired", "alpha-sweep")
        for mask in p.experiments.masks:
            add(p.stack_for_mask(mask), p.merger.alpha, "paired", f"mask:{mask}")
        summary["stacks"] = list(stacks.values())

        # The naive approach: the mean of the members' logits.
        ens_dir = self.ensemble_dir(default)
        summary["ensemble"] = {"members": list(default), "key": self.key(ens_dir),
                               **self.evaluate(self.ensemble(default), ens_dir, ("clean", "pgd10", "pgd20"))}

        # Table IV: the single 8/255 network (PGD-AT) and the default stack, every column on the AutoAttack
        # subset (so the trade-off mean(clean, AA) averages two numbers measured on the same images); the
        # clean and PGD-20 accuracies on the whole test subset stand beside them as *_test.
        b8 = self.robust_budget()
        aa8 = self.evaluate(self.extractor(b8), self.extractor_dir(eps_from_budget(b8)), ("clean", "pgd20", "aa"),
                            subset="aa")
        st = stacks[stack_name(default, p.merger.alpha, p.merger.mode)]
        e8 = summary["extractors"][str(b8)]
        rows = [(f"PGD-AT ({b8}/255)", e8["key"], aa8["clean"], aa8["pgd20"], aa8["aa"], e8),
                ("AFS", st["key"], st["aa_clean"], st["aa_pgd20"], st["aa"], st)]
        summary["comparison"] = {
            "aa_images": len(self.data.aa_index),
            "aa_attacks": list(p.evaluation.aa_attacks) or p.evaluation.aa_version,  # what "AA" ran
            "subset": "aa",
            "rows": [{"method": method, "key": key, "clean": clean, "pgd": pgd, "aa": aa,
                      "tradeoff": trade_off(clean, aa), "clean_test": test["clean"], "pgd_test": test["pgd20"]}
                     for method, key, clean, pgd, aa, test in rows],
        }
        summary["ablation"] = self.run_ablation(default, b8, e8, st)
        summary["curves"] = self.run_curves(default)
        summary["audit"] = audit.run_audit(self, default)
        summary["samples"] = collect_samples(self, summary)
        # Evidence: a 95% interval on every accuracy, the paper's claims and the audit's checks as verdicts.
        from afs import evidence

        evidence.attach_intervals(summary)
        summary["claims"] = evidence.evaluate_claims(summary)
        summary["audit"]["checks"] = evidence.evaluate_claims(summary, which="audit") + [audit.aa_flag_check(summary)]
        total = round(time.time() - t_start, 1)
        # total_s: the profile's whole cost, known when this call computed every stage (a fresh run);
        # a call that reused finished stages knows only its own part.
        summary["timings"] = {**self.timings, "total_this_call_s": total, "total_s": None if self.reused else total,
                              "reused": sorted(self.reused)}
        validate_summary(summary)
        if write:
            atomic_write_json(self.root / "summary.json", summary)
        return summary

    def run_ablation(self, default: Sequence[int], b8: int, e8: dict[str, Any],
                     st: dict[str, Any]) -> list[dict[str, Any]]:
        """Table VI: baseline, random budget per batch, a wider single network, AFS; params and FLOPs."""
        lo, hi = self.profile.experiments.random_budget_range
        wide = self.wide_model()
        rand, wide_net = self.extractor((lo, hi)), self.extractor(b8, wide)  # both trained, then evaluated
        rows = [(f"Baseline ({b8}/255)", self.extractor(b8), e8)]
        for setting, net, d in ((f"Rand. pert. ({lo}-{hi}/255)", rand, self.extractor_dir(eps_from_budget((lo, hi)))),
                                (f"Large model (WRN-{wide.depth}-{wide.widen_factor}, {b8}/255)", wide_net,
                                 self.extractor_dir(eps_from_budget(b8), wide))):
            rows.append((setting, net, {"key": self.key(d), **self.evaluate(net, d, ("clean", "pgd20"))}))
        rows.append(("AFS", self.stack(default), st))
        return [{"setting": setting, "key": acc["key"], **{k: c[k] for k in ("params_M", "flops_G", "macs_G")},
                 "clean": acc["clean"], "pgd20": acc["pgd20"]}
                for setting, net, acc in rows for c in [cost.network_cost(net)]]

    def run_curves(self, default: Sequence[int]) -> dict[str, Any]:
        """Fig. 4a: PGD-10 accuracy vs eps for the default stack and each single network it stacks."""
        mc = self.profile.merger
        models = {"AFS": (self.stack(default), self.stack_dir(default, mc.alpha, mc.mode))}
        for b in default:
            models[f"#{b} ({b}/255)"] = (self.extractor(b), self.extractor_dir(eps_from_budget(b)))
        return {"budgets_255": list(self.profile.evaluation.curve_budgets), "images": len(self.data.curve_index),
                "subset": "curve", "keys": {k: self.key(d) for k, (_, d) in models.items()},
                "accuracy": {k: self.curve(m, d) for k, (m, d) in models.items()}}


def run_name(profile: Profile) -> str:
    """The folder of a profile's runs under ``out``: its name, plus ``-seed<N>`` when the seed is not the
    named profile's own (a second seed never reuses the first seed's stages), plus ``-set<hash>`` when
    ``--set`` changed it (one folder per set of changes; the changes are in every config.json)."""
    from afs.config import PROFILES

    own = PROFILES.get(profile.name)
    name = profile.name if own is None or own.seed == profile.seed else f"{profile.name}-seed{profile.seed}"
    changes = [o for o in profile.overrides if not o.startswith("seed=")]  # the seed is named already
    if changes:
        name += "-set" + hashlib.sha256("\n".join(changes).encode()).hexdigest()[:8]
    return name
