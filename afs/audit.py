"""The robustness audit (notebook 08): is the stack's robustness real, or gradient masking?

Carlini et al.'s checklist, the parts a stacked model needs, run through a `afs.pipeline.Pipeline` (its
cache, seeds and precision); each check becomes a verdict in `afs.evidence` (``which="audit"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from afs import progress
from afs.config import Profile, eps_from_budget
from afs.evaluation import evaluate
from afs.io import atomic_torch_save, atomic_write_json, load_torch, read_json
from afs.runs import RunDir

if TYPE_CHECKING:
    from afs.pipeline import Pipeline

__all__ = ["audit_attacks", "run_audit", "aa_flag_check"]


def audit_attacks(profile: Profile) -> dict[str, str]:
    """The audit's attacks by role: PGD-20 (the reported one), a stronger PGD (more steps, restarts),
    PGD-20 on the CW margin loss."""
    ev = profile.evaluation
    strong = f"pgd{ev.audit_steps}" + (f"x{ev.audit_restarts}" if ev.audit_restarts > 1 else "")
    return {"pgd20": "pgd20", "strong": strong, "cw20": "cw20"}


def run_audit(pipe: Pipeline, default: Sequence[int]) -> dict[str, Any]:
    """The checklist on the audit subset, for the default stack and its most robust member:

    (a) PGD-20 crafted on each member and on the logit ensemble, scored on the stack (transfer);
    (b) PGD-20 at growing eps up to 64/255 (step eps/4): accuracy must fall to about 0;
    (c) PGD with more steps and restarts against PGD-20;
    (d) PGD-20 on the CW margin loss against PGD-20 on cross-entropy;
    (e) AutoAttack's own flags, from the Table IV runs;
    (f) PGD-20 crafted in fp32 against the reported PGD-20 (crafted under the profile's precision).
    Results are cached per model in ``<stage>/eval_audit*.{json,pt}`` (transfer in ``audit/``)."""
    ev, p = pipe.profile.evaluation, pipe.profile
    b8 = pipe.robust_budget()
    stack_d = pipe.stack_dir(default, p.merger.alpha, p.merger.mode)
    models = {"stack": (pipe.stack(default), stack_d),
              "member": (pipe.extractor(b8), pipe.extractor_dir(eps_from_budget(b8)))}
    roles = audit_attacks(pipe.profile)
    out: dict[str, Any] = {"subset": "audit", "images": len(pipe.data.audit_index), "attacks": roles,
                           "eps_sweep_255": [8, *ev.audit_budgets], "models": {}, "transfer": {}}
    for who, (model, d) in models.items():
        acc = pipe.evaluate(model, d, ("clean", *roles.values()), subset="audit")
        rec = {"key": pipe.key(d), **{role: acc[name] for role, name in roles.items()}, "clean": acc["clean"]}
        for b in ev.audit_budgets:  # (b)
            eps = eps_from_budget(b)
            rec[f"eps{b}"] = _audit_pgd20(pipe, model, d, f"eps{b}", eps, eps / 4, pipe.craft_precision)
        # (f) the reported PGD-20 is crafted under the profile's precision (bf16 where the hardware has it)
        # and scored in fp32; the same attack crafted in fp32 must not be stronger.
        rec["pgd20_fp32"] = _audit_pgd20(pipe, model, d, "pgd20_fp32", ev.eps, ev.step_size, "fp32")
        out["models"][who] = rec
    # (a) transfer onto the stack, from each member and from the mean-of-logits ensemble.
    sources = {**{f"#{b}": pipe.extractor(b) for b in default}, "ensemble": pipe.ensemble(default)}
    out["transfer"] = {name: _audit_transfer(pipe, models["stack"][0], src, name) for name, src in sources.items()}
    out["autoattack_flags"] = {who: pipe.aa_flags(d) for who, (_, d) in models.items()}
    return out


def _audit_pgd20(pipe: Pipeline, model: nn.Module, where: Path, name: str, eps: float, step_size: float,
                 precision: str) -> float:
    """PGD-20 on the audit subset crafted under ``precision``, cached as attack ``name`` in the stage's
    ``eval_audit_eps.{json,pt}`` (one file for the sweep: each entry's eps, step and precision are in its
    name, the rest of what made it in the file's setting)."""
    path, spath = where / "eval_audit_eps.json", where / "eval_audit_eps.pt"
    with RunDir(where).lock():
        setting = pipe._setting(model, "audit", steps=20)
        done = read_json(path) if path.is_file() else {}
        if done.get("setting") != setting or not spath.is_file():
            done = {"setting": setting, "accuracy": {}}  # another model or protocol: start the file over
        if name in done["accuracy"]:
            pipe.reused.add(f"{pipe.key(where)} [audit {name}]")
            return done["accuracy"][name]
        x, y = pipe._subset("audit")
        t0 = progress.begin("eval", f"{pipe.key(where)} [audit]", [name])
        res = evaluate(model, x, y, ("pgd20",), eps=eps, step_size=step_size,
                       batch_size=pipe.profile.evaluation.batch_size, seed=pipe.profile.seed, device=pipe.device,
                       progress=False, craft_precision=precision, compile=pipe.profile.compile_attacks)
        pipe._time(f"audit {where.name} {name}", t0)
        flags = load_torch(spath) if done["accuracy"] else {}
        flags[name] = res.correct["pgd20"]
        atomic_torch_save(flags, spath)
        done["accuracy"][name] = res.accuracy["pgd20"]
        atomic_write_json(path, done)
        return done["accuracy"][name]


def _audit_transfer(pipe: Pipeline, target: nn.Module, source: nn.Module, name: str) -> float:
    """(a) Accuracy of ``target`` on PGD-20 examples crafted on ``source`` (the white-box run's seeds),
    cached in ``audit/transfer/eval_<name>.{json,pt}``, keyed by both models' weights."""
    ev, d, stem = pipe.profile.evaluation, pipe.root / "audit" / "transfer", name.strip("#")
    path, spath = d / f"eval_{stem}.json", d / f"eval_{stem}.pt"
    with RunDir(d).lock():
        setting = pipe._setting(target, "audit", eps=ev.eps, step_size=ev.step_size,
                                source=pipe._setting(source, "audit")["model"])
        if path.is_file() and spath.is_file() and read_json(path).get("setting") == setting:
            pipe.reused.add(f"audit/transfer/{stem} [audit]")
            return read_json(path)["accuracy"]
        x, y = pipe._subset("audit")
        t0 = progress.begin("eval", f"audit/transfer/{stem} [audit]")
        res = evaluate(target, x, y, ("pgd20",), eps=ev.eps, step_size=ev.step_size, batch_size=ev.batch_size,
                       seed=pipe.profile.seed, device=pipe.device, progress=False, craft_on=source,
                       craft_precision=pipe.craft_precision, compile=pipe.profile.compile_attacks)
        pipe._time(f"audit transfer {name}", t0)
        atomic_torch_save({"pgd20": res.correct["pgd20"]}, spath)
        atomic_write_json(path, {"setting": setting, "accuracy": res.accuracy["pgd20"]})
        return res.accuracy["pgd20"]


def aa_flag_check(summary: dict[str, Any]) -> dict[str, Any]:
    """(e) as a verdict: AutoAttack's own checks raised nothing on the stack or the member."""
    flags = summary["audit"]["autoattack_flags"]
    n = sum(len(v) for v in flags.values())
    return {"id": "audit-autoattack-flags", "source": "audit (e)", "subset": "aa", "op": "<", "threshold": 1,
            "unit": "flags", "claim": "AutoAttack's own checks (pyautoattack checks.py) raised no flag on the stack "
                                      "or the member", "compares": "number of AutoAttack warnings",
            "paper": None, "estimate": float(n), "ci95": [float(n), float(n)], "n": summary["comparison"]["aa_images"],
            "verdict": "holds" if n == 0 else "fails", "flags": flags}
