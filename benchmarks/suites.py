"""The benchmark suites: what the GPU-speed issue asks to measure, each against a baseline of the same run.

=============  =========================================================================================
suite          measures (baseline in brackets)
=============  =========================================================================================
pgd            PGD-10 images/s and achieved TFLOP/s: (a) authors'-style eager fp32 loop [itself],
               (b) our eager loop, (c) compiled + bf16 + channels_last, (d) (c) with CUDA graphs
stack          one attack gradient (forward + input-gradient backward) of an n-member stack: members in
               a Python loop [itself], one CUDA stream per member
pgd_step       the fused PGD step kernel's GB/s: eager torch sequence [device-to-device copy], fused
               Triton kernel [eager torch sequence]; copy bandwidth measured in the same run
at_epoch       one PGD-10 adversarial-training epoch: authors'-style eager fp32 [itself, extrapolated from
               a few batches], compiled bf16 channels_last (full epoch); plus the counted compute bound
merger_head    the fused merger-head kernel, forward and forward+backward: unfused eager [itself],
               unfused torch.compile'd, fused Triton
cpu            on the CPU, the cpu profile's SmallCNN(2) at CIFAR shapes, batch 128: PGD-10 images/s of
               torchattacks fp32 [itself], ours eager fp32, ours bf16 + channels_last, that compiled
               (compile time apart); the robust accuracy each leaves on the same images of the same
               briefly PGD-AT-trained model [torchattacks]; a 20-batch PGD-3 AT epoch: eager fp32 [itself],
               bf16 + channels_last, attack compiled. Without torchattacks: [ours eager fp32], said once
=============  =========================================================================================

Every suite takes a :class:`BenchConfig`; the full-size defaults are the issue's (WRN-28-10, CIFAR shapes,
batches 128 and 512), and a CPU dry run passes a tiny WRN-10-1, batch 8 and ``compile_backend="eager"``.
The ``cpu`` suite has its own ``cpu_*`` options (its network and shapes are fixed) and runs only on
``--device cpu``; elsewhere it prints that it is skipped.
CUDA-only cases (CUDA graphs, streams) are skipped off CUDA with a printed note, never silently.

FLOPs are counted with ``torch.utils.flop_counter`` (one multiply-accumulate = 2 FLOPs), per image: the
*useful* work of one PGD step is a forward plus the backward to the input (no weight gradients).
"""

from __future__ import annotations

import copy
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from afs.attacks import PGD
from afs.data import balanced_subset, load_dataset
from afs.evidence import Bootstrap, percentile_interval
from afs.models import SmallCNN, WideResNet
from afs.runs import AutocastModel
from afs.stacking import StackedModel
from afs_kernels import merger_head, pgd_loop, pgd_step, random_start, sum_cross_entropy
from afs_kernels._common import HAS_TRITON, is_interpreted
from afs_kernels.attack_loop import _frozen_parameters
from afs_kernels.pgd_step import _math as pgd_step_math
from afs_kernels.pgd_step import _pgd_linf_kernel

from .harness import Recorder, Timing, first_call_seconds, measure

# The issue's reference figures. Ratios always use baselines measured in the same run; these are context.
PEAK_BF16_TFLOPS = 788.0  # dense bf16 tensor-core rate the issue measures against
ISSUE_AT_EPOCH_BOUND_S = 15.3  # 50,000 x (10 x 2 + 3) x 10.49 GFLOP / 788 TFLOP/s
EPS, ALPHA = 8 / 255, 2 / 255  # the paper's attack budget and step

SPEEDUP = "speedup = baseline median time / this median time"
BW_FRACTION = "fraction = this GB/s / baseline GB/s"


@dataclass(frozen=True)
class BenchConfig:
    """Options shared by every suite. Defaults are the full-size GPU run of the issue."""

    device: str = "cuda"
    batch_sizes: tuple[int, ...] = (128, 512)
    model: str = "wrn-28-10"  # "wrn-<depth>-<widen>": WRN-28-10 is the paper's extractor
    image_size: int = 32  # CIFAR
    num_classes: int = 10
    steps: int = 10  # PGD iterations
    members: int = 6  # extractors of the stack (stack and merger_head suites)
    warmup: int = 2  # untimed calls before timing (after the first, compiling call)
    reps: int = 5  # timed repetitions; the median is reported
    compile_backend: str = "inductor"  # tests use "eager" (no codegen) to stay fast
    peak_tflops: float = PEAK_BF16_TFLOPS
    bandwidth_batch: int = 16384  # pgd_step: an extra, bandwidth-bound batch (0: skip)
    epoch_images: int = 50_000  # at_epoch: images in the epoch
    epoch_batch_size: int = 512  # at_epoch: training batch
    epoch_baseline_batches: int = 3  # at_epoch: eager batches timed, then extrapolated to the epoch
    # The cpu suite (the cpu profile's SmallCNN at CIFAR shapes on the CPU; it ignores model, image_size,
    # num_classes and batch_sizes above, and uses steps, warmup, reps, compile_backend and epoch_images).
    cpu_batch_size: int = 128  # attack and training batch
    cpu_train_steps: int = 200  # PGD-AT steps that train the attacked model first (0: attack a random init)
    cpu_eval_batches: int = 2  # batches every variant attacks for the strength rows (the same ones for all)
    cpu_epoch_batches: int = 20  # batches of the timed PGD-AT epoch
    cpu_compile: bool = True  # also the torch.compile'd variants (first call = compile, reported apart)
    data_root: str | None = None  # folder holding `dataset` (afs.data); None: synthetic CIFAR-shaped data
    dataset: str = "cifar10-jpeg"  # what data_root holds (an afs.data.DATASETS name)
    seed: int = 0
    results_dir: str = "results/bench"
    notes: tuple[str, ...] = field(default_factory=tuple)  # free text carried into every row

    def __post_init__(self) -> None:
        parse_model(self.model)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {self.batch_sizes}")
        for name in ("image_size", "steps", "members", "reps", "epoch_images", "epoch_batch_size", "epoch_baseline_batches",
                     "cpu_batch_size", "cpu_eval_batches", "cpu_epoch_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (WRN downsamples twice), got {self.image_size}")
        if self.cpu_train_steps < 0:
            raise ValueError(f"cpu_train_steps must be >= 0, got {self.cpu_train_steps}")
        if self.warmup < 0 or self.bandwidth_batch < 0 or self.num_classes < 2 or self.peak_tflops <= 0:
            raise ValueError("need warmup >= 0, bandwidth_batch >= 0, num_classes >= 2 and peak_tflops > 0")
        if self.epoch_images < self.epoch_batch_size:
            raise ValueError(f"epoch_images ({self.epoch_images}) must hold at least one batch ({self.epoch_batch_size})")

    def torch_device(self) -> torch.device:
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; pass --device cpu for a dry run")
        return dev


def parse_model(spec: str) -> tuple[int, int]:
    """``"wrn-28-10"`` -> (28, 10)."""
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", spec.lower())
    if not m:
        raise ValueError(f"unknown model {spec!r}; expected 'wrn-<depth>-<widen>', e.g. 'wrn-28-10' or 'wrn-10-1'")
    return int(m.group(1)), int(m.group(2))


def build_model(cfg: BenchConfig, device: torch.device, seed: int) -> WideResNet:
    """A freshly initialised WRN in eval mode (weights do not change speed; random is fine)."""
    depth, widen = parse_model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WideResNet(depth, widen, cfg.num_classes)
    return model.to(device).eval()


def _data(cfg: BenchConfig, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and labels: speed does not depend on the pixels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA (the fast configuration); fp32 on the CPU (a dry run checks plumbing only)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _fast_dtype(device: torch.device) -> str:
    return "bfloat16-autocast" if device.type == "cuda" else "float32"


def _fits_in_l2(device: torch.device, nbytes: int) -> bool | None:
    """Whether ``nbytes`` fit in the GPU's L2 cache (None off CUDA). Repeated passes over data that fits
    measure the cache, not HBM: such GB/s are marked, and the bandwidth-bound batch is the honest one."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return bool(l2) and nbytes <= l2


def _cheap_reps(cfg: BenchConfig, device: torch.device, floor: int) -> tuple[int, int]:
    """(warmup, reps) for microsecond-scale cases: on CUDA at least ``floor`` repetitions (and 3 warm-ups),
    since one launch is noise-sized and many cost nothing; a CPU dry run keeps the configured counts."""
    if device.type != "cuda":
        return cfg.warmup, cfg.reps
    return max(cfg.warmup, 3), max(cfg.reps, floor)


def _release(device: torch.device) -> None:
    """Return cached blocks between cases so one case's peak memory does not squeeze the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------
# FLOP counting (per image)
# --------------------------------------------------------------------------------------------------------
def _count(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def attack_step_flops(model: nn.Module, cfg: BenchConfig, device: torch.device, *, weight_grads: bool) -> int:
    """FLOPs of one attack step on one image: forward + backward to the input, plus the weight gradients
    when ``weight_grads`` (what the authors' loop executes with parameter gradients left on)."""
    model = copy.deepcopy(model)
    x, y = _data(cfg, 1, device, cfg.seed)

    def step() -> None:
        # backward() rather than autograd.grad: the counter's module hooks refuse autograd.grad on a leaf.
        # With the parameters frozen, backward() computes the input gradient only, as the attack loop does.
        xi = x.clone().requires_grad_(True)
        sum_cross_entropy(model(xi), y).backward()

    if weight_grads:
        return _count(step)
    with _frozen_parameters(model):
        return _count(step)


def train_step_flops(model: nn.Module, cfg: BenchConfig, device: torch.device) -> int:
    """FLOPs of one training step on one image: forward + backward to the weights (no input gradient)."""
    model = copy.deepcopy(model).train()  # a copy: the train-mode forward updates BN running statistics
    x, y = _data(cfg, 2, device, cfg.seed)  # 2 images: train-mode BN needs more than one value per channel

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    return _count(step) // 2


# --------------------------------------------------------------------------------------------------------
# The authors'-style attack (a timing baseline only)
# --------------------------------------------------------------------------------------------------------
def authors_style_pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int
) -> torch.Tensor:
    """A replica of the authors' released PGD *for timing*: triangular start ``(U - U) * eps``, the loss's
    ``backward()`` with parameter gradients left on (every step also computes and accumulates all weight
    gradients), projection each step, box clamp only after the loop. The project's attack is
    ``afs_kernels.pgd_loop``; this exists so the speed-up over the release is measured, not assumed."""
    x_adv = x + (torch.rand_like(x) - torch.rand_like(x)) * eps
    for _ in range(steps):
        leaf = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(leaf), y)
        loss.backward()  # fills leaf.grad AND every parameter's .grad, as in the release
        x_adv = leaf.detach() + alpha * leaf.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    model.zero_grad(set_to_none=True)
    return x_adv.clamp(0.0, 1.0)


def _triton_runs(device: torch.device, rec: Recorder, case: str) -> bool:
    """Whether the Triton kernels can run on ``device``. Off CUDA without the interpreter the fused case is
    skipped with a note; on CUDA a kernel that cannot run is an error (the case is what is being measured)."""
    interpreted = is_interpreted(_pgd_linf_kernel)
    if not HAS_TRITON:
        reason = "triton is not installed"
    elif device.type == "cuda" and interpreted:
        reason = "TRITON_INTERPRET=1 is set, so the kernels are interpreted on the CPU; run with TRITON_INTERPRET=0"
    elif device.type != "cuda" and not interpreted:
        reason = "Triton runs off CUDA only under TRITON_INTERPRET=1"
    else:
        return True
    if device.type == "cuda":
        raise RuntimeError(f"{case}: {reason}")
    rec.note(f"{case} skipped: {reason}")
    return False


def _compiled(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> tuple[float, Timing]:
    """(first-call seconds = compile + one run, steady-state timing after ``warmup`` more calls)."""
    compile_s = first_call_seconds(fn, device)
    return compile_s, measure(fn, device, warmup=warmup, reps=reps)


# --------------------------------------------------------------------------------------------------------
# Suite 1: PGD-10 throughput
# --------------------------------------------------------------------------------------------------------
def suite_pgd(cfg: BenchConfig, rec: Recorder) -> None:
    """PGD-``steps`` images/s and achieved TFLOP/s for the four loop variants, per batch size."""
    device = cfg.torch_device()
    model = build_model(cfg, device, cfg.seed)  # NCHW fp32: variants (a) and (b)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)  # (c)/(d): same weights, NHWC
    useful = attack_step_flops(model, cfg, device, weight_grads=False)
    executed_authors = attack_step_flops(model, cfg, device, weight_grads=True)
    rec.note(f"{cfg.model}: {useful / 1e9:.3f} GFLOP per image per attack step (forward + input gradient), "
             f"{executed_authors / 1e9:.3f} with weight gradients")

    for batch in cfg.batch_sizes:
        with rec.guard(f"B={batch}"):
            _pgd_batch(cfg, rec, device, model, fast, batch, useful, executed_authors)


def _pgd_batch(cfg: BenchConfig, rec: Recorder, device: torch.device, model: nn.Module, fast: nn.Module, batch: int,
               useful: int, executed_authors: int) -> None:
    """The four PGD variants at one batch size; (a) is the baseline of every row."""
    on_cuda = device.type == "cuda"
    x, y = _data(cfg, batch, device, cfg.seed + batch)
    shapes = {"x": list(x.shape), "steps": cfg.steps}

    def extra(t: Timing, **more: Any) -> dict[str, Any]:
        achieved = useful * cfg.steps * batch / t.median_s / 1e12
        return {"useful_flops_per_image_step": useful, "achieved_tflops": achieved,
                "fraction_of_peak": achieved / cfg.peak_tflops, "peak_tflops": cfg.peak_tflops, **more}

    def add(case: str, t: Timing, dtype: str, compile_s: float | None = None, **more: Any) -> None:
        rec.add(case, baseline="authors_eager_fp32", ratio=t_a.median_ms / t.median_ms, ratio_meaning=SPEEDUP,
                metric="images_per_s", value=batch / t.median_s, unit="images/s", timing=t, batch_size=batch,
                model=cfg.model, dtype=dtype, shapes=shapes, compile_s=compile_s, extra=extra(t, **more))

    # (a) the authors' style: eager fp32, parameter gradients computed at every step.
    t_a = measure(lambda: authors_style_pgd(model, x, y, EPS, ALPHA, cfg.steps), device,
                  warmup=cfg.warmup, reps=cfg.reps)
    add("authors_eager_fp32", t_a, "float32", executed_flops_per_image_step=executed_authors)
    _release(device)

    # (b) our eager loop: input gradients only (torch.autograd.grad), fused step kernel on CUDA.
    def ours() -> torch.Tensor:
        return pgd_loop(model, x, y, random_start(x, EPS, seed=cfg.seed), EPS, ALPHA, cfg.steps)

    t_b = measure(ours, device, warmup=cfg.warmup, reps=cfg.reps)
    add("ours_eager_fp32", t_b, "float32")
    _release(device)

    # (c) compiled + bf16 autocast + channels_last; static shapes (one graph per batch size).
    t_c: Timing | None = None
    with rec.guard(f"B={batch} compiled_bf16_channels_last"):
        # bf16 on CUDA through an autocast wrapper; channels_last: fast's weights are, and so are the inputs.
        target_c = AutocastModel(fast, device.type) if on_cuda else fast
        x_cl = x.contiguous(memory_format=torch.channels_last)
        opts_c = {"backend": cfg.compile_backend, "dynamic": False}

        def compiled() -> torch.Tensor:
            return pgd_loop(target_c, x_cl, y, random_start(x_cl, EPS, seed=cfg.seed), EPS, ALPHA, cfg.steps,
                            compile=opts_c)

        comp_c, t_c = _compiled(compiled, device, cfg.warmup, cfg.reps)
        add("compiled_bf16_channels_last", t_c, _fast_dtype(device), comp_c,
            speedup_vs_ours_eager=t_b.median_ms / t_c.median_ms)
        del target_c
    _release(device)

    # (d) (c) with CUDA graphs (Inductor's "reduce-overhead"): removes launch overhead between kernels.
    if not on_cuda:
        rec.note(f"B={batch} compiled_bf16_channels_last_cudagraphs skipped: CUDA graphs need a CUDA device")
        return
    with rec.guard(f"B={batch} compiled_bf16_channels_last_cudagraphs"):
        target_d = AutocastModel(fast, device.type)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        opts_d = {"backend": cfg.compile_backend, "mode": "reduce-overhead", "dynamic": False}

        def graphed() -> torch.Tensor:
            return pgd_loop(target_d, x_cl, y, random_start(x_cl, EPS, seed=cfg.seed), EPS, ALPHA, cfg.steps,
                            compile=opts_d)

        # Two warm-ups at least: CUDA-graph trees record on a later call than the compiling one.
        comp_d, t_d = _compiled(graphed, device, max(cfg.warmup, 2), cfg.reps)
        vs_c = {"speedup_vs_compiled": t_c.median_ms / t_d.median_ms} if t_c is not None else {}
        add("compiled_bf16_channels_last_cudagraphs", t_d, "bfloat16-autocast", comp_d,
            speedup_vs_ours_eager=t_b.median_ms / t_d.median_ms, **vs_c)
        del target_d
    _release(device)


# --------------------------------------------------------------------------------------------------------
# Suite 2: an n-member stack, loop vs streams
# --------------------------------------------------------------------------------------------------------
def suite_stack(cfg: BenchConfig, rec: Recorder) -> None:
    """One attack gradient of an n-member stacked model (Eq. 1-2), three ways of running the members."""
    device = cfg.torch_device()
    on_cuda = device.type == "cuda"
    members = [build_model(cfg, device, cfg.seed + i) for i in range(cfg.members)]
    if on_cuda:
        members = [m.to(memory_format=torch.channels_last) for m in members]
    stack = StackedModel(members, cfg.num_classes).to(device).eval()
    useful = attack_step_flops(members[0], cfg, device, weight_grads=False) * cfg.members
    streams = [torch.cuda.Stream(device) for _ in members] if on_cuda else []

    def loop_features(x: torch.Tensor) -> torch.Tensor:
        return stack.features(x)  # members one after another

    def stream_features(x: torch.Tensor) -> torch.Tensor:
        # One side stream per member, each waiting for the input; the main stream waits for all before the
        # concat. Autograd runs each member's backward on the stream its forward used, synchronised for us.
        main = torch.cuda.current_stream(device)
        feats = []
        for member, stream in zip(stack.extractors, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                feats.append(member.features(x))
        for stream in streams:
            main.wait_stream(stream)
        return torch.cat(feats, dim=1)

    variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("loop", loop_features),
    ]
    if on_cuda:
        variants.append(("cuda_streams", stream_features))
    else:
        rec.note("cuda_streams skipped: CUDA streams need a CUDA device")

    for batch in cfg.batch_sizes:
        x, y = _data(cfg, batch, device, cfg.seed + batch)
        if on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        shapes = {"x": list(x.shape), "members": cfg.members}
        baseline: Timing | None = None
        for case, features in variants:

            def attack_gradient(features: Callable[[torch.Tensor], torch.Tensor] = features) -> torch.Tensor:
                xi = x.detach().requires_grad_(True)
                with _autocast(device):
                    logits = stack.merger(features(xi))  # Eq. 1 on the concatenated features
                (grad,) = torch.autograd.grad(sum_cross_entropy(logits, y), xi)
                return grad

            with rec.guard(f"B={batch} {case}"):
                t = measure(attack_gradient, device, warmup=cfg.warmup, reps=cfg.reps)
                baseline = baseline or t  # the loop runs first
                achieved = useful * batch / t.median_s / 1e12
                rec.add(case, baseline="loop", ratio=baseline.median_ms / t.median_ms, ratio_meaning=SPEEDUP,
                        metric="images_per_s", value=batch / t.median_s, unit="images/s (one attack gradient)",
                        timing=t, batch_size=batch, model=cfg.model, dtype=_fast_dtype(device), shapes=shapes,
                        extra={"achieved_tflops": achieved, "fraction_of_peak": achieved / cfg.peak_tflops,
                               "useful_flops_per_image": useful})
            _release(device)
            if baseline is None:
                rec.note(f"B={batch}: the loop baseline failed; skipping the other variants at this batch size")
                break


# --------------------------------------------------------------------------------------------------------
# Suite 3: the fused PGD step against copy bandwidth and the eager torch sequence
# --------------------------------------------------------------------------------------------------------
def suite_pgd_step(cfg: BenchConfig, rec: Recorder) -> None:
    """GB/s of one PGD step (reads x, grad, x_nat; writes x'): fused kernel vs eager torch vs a plain copy."""
    device = cfg.torch_device()
    batches = list(cfg.batch_sizes) + ([cfg.bandwidth_batch] if cfg.bandwidth_batch else [])
    for batch in batches:
        with rec.guard(f"B={batch}"):
            _pgd_step_batch(cfg, rec, device, batch)
        _release(device)


def _pgd_step_batch(cfg: BenchConfig, rec: Recorder, device: torch.device, batch: int) -> None:
    warmup, reps = _cheap_reps(cfg, device, 20)
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_nat = torch.rand(shape, generator=gen).to(device)
    x = (x_nat + 0.01 * torch.randn(shape, generator=gen).to(device)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen).to(device)
    n = x.numel()
    moved = 4 * n * x.element_size()  # 3 tensors read + 1 written: the minimum traffic of any step
    shapes = {"x": list(shape)}

    # Baseline: a device-to-device copy moving the same bytes (2n elements read, 2n written).
    src = torch.empty(2 * n, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device, warmup=warmup, reps=reps)
    copy_gbs = moved / t_copy.median_s / 1e9
    rec.add("copy", baseline="copy", ratio=1.0, ratio_meaning=BW_FRACTION, metric="bandwidth", value=copy_gbs,
            unit="GB/s", timing=t_copy, batch_size=batch, model=None, dtype="float32", shapes=shapes,
            extra={"bytes": moved, "fits_in_l2": _fits_in_l2(device, moved)})
    del src, dst
    eps_t = torch.full((), EPS, device=device)
    step_t = torch.full((), ALPHA, device=device)
    t_eager = measure(lambda: pgd_step_math(x, grad, x_nat, eps_t, step_t, True), device, warmup=warmup, reps=reps)
    eager_gbs = moved / t_eager.median_s / 1e9
    rec.add("eager_torch_Linf", baseline="copy", ratio=eager_gbs / copy_gbs, ratio_meaning=BW_FRACTION,
            metric="effective_bandwidth", value=eager_gbs, unit="GB/s", timing=t_eager, batch_size=batch,
            model=None, dtype="float32", shapes=shapes,
            extra={"bytes": moved, "fits_in_l2": _fits_in_l2(device, moved)})
    if not _triton_runs(device, rec, f"B={batch} fused_triton_Linf"):
        return
    fused = lambda: pgd_step(x, grad, x_nat, eps_t, step_t, backend="triton", check=False)  # noqa: E731
    fused()  # the first call JIT-compiles the kernel: kept out of the timing
    t_fused = measure(fused, device, warmup=warmup, reps=reps)
    fused_gbs = moved / t_fused.median_s / 1e9
    rec.add("fused_triton_Linf", baseline="eager_torch_Linf", ratio=t_eager.median_ms / t_fused.median_ms,
            ratio_meaning=SPEEDUP, metric="effective_bandwidth", value=fused_gbs, unit="GB/s", timing=t_fused,
            batch_size=batch, model=None, dtype="float32", shapes=shapes,
            extra={"bytes": moved, "fraction_of_copy_bandwidth": fused_gbs / copy_gbs, "copy_GBps": copy_gbs,
                   "fits_in_l2": _fits_in_l2(device, moved)})


# --------------------------------------------------------------------------------------------------------
# Suite 4: one PGD-10 adversarial-training epoch
# --------------------------------------------------------------------------------------------------------
def suite_at_epoch(cfg: BenchConfig, rec: Recorder) -> None:
    """Seconds for one PGD-AT epoch (attack in eval mode, then one SGD step) on random data."""
    device = cfg.torch_device()
    on_cuda = device.type == "cuda"
    batch = cfg.epoch_batch_size
    n_batches = cfg.epoch_images // batch  # full batches only: a ragged last batch would recompile
    images = n_batches * batch
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = torch.rand(images, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    y_all = torch.randint(0, cfg.num_classes, (images,), generator=gen).to(device)
    shapes = {"x": [batch, 3, cfg.image_size, cfg.image_size], "images": images, "steps": cfg.steps}

    probe = build_model(cfg, device, cfg.seed)
    attack_flops = attack_step_flops(probe, cfg, device, weight_grads=False)
    per_image = cfg.steps * attack_flops + train_step_flops(probe, cfg, device)  # 10 x (fwd + input bwd) + 1 x 3
    bound_s = cfg.epoch_images * per_image / (cfg.peak_tflops * 1e12)
    rec.note(f"compute bound: {cfg.epoch_images} images x {per_image / 1e9:.4g} GFLOP / {cfg.peak_tflops} TFLOP/s "
             f"= {bound_s:.4g} s (issue: {ISSUE_AT_EPOCH_BOUND_S} s for WRN-28-10)")
    del probe

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    # Baseline: the authors' style -- eager fp32 attack with weight gradients, eager fp32 training step.
    model_a = build_model(cfg, device, cfg.seed)
    opt_a = sgd(model_a)

    def authors_batch(i: int) -> None:
        x, y = x_all[i * batch : (i + 1) * batch], y_all[i * batch : (i + 1) * batch]
        model_a.eval()
        x_adv = authors_style_pgd(model_a, x, y, EPS, ALPHA, cfg.steps)
        model_a.train()
        loss = F.cross_entropy(model_a(x_adv), y)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_a.step()

    timed = min(cfg.epoch_baseline_batches, n_batches)
    base_s: float | None = None
    with rec.guard("authors_eager_fp32"):
        authors_batch(0)  # warm-up (cuDNN algorithm choice, allocator)
        t_a = measure(lambda: [authors_batch(i % n_batches) for i in range(timed)], device, warmup=0, reps=1)
        base_s = t_a.median_s / timed * n_batches * cfg.epoch_images / images  # extrapolated to the epoch
        rec.add("authors_eager_fp32", baseline="authors_eager_fp32", ratio=1.0, ratio_meaning=SPEEDUP,
                metric="epoch_time", value=base_s, unit="s/epoch", timing=t_a, batch_size=batch, model=cfg.model,
                dtype="float32", shapes=shapes,
                extra={"extrapolated_from_batches": timed, "compute_bound_s": bound_s,
                       "time_over_bound": base_s / bound_s, "flops_per_image": per_image})
    del model_a, opt_a
    _release(device)

    # Ours: compiled bf16 channels_last attack, bf16-autocast channels_last training step, whole epoch timed.
    model = build_model(cfg, device, cfg.seed).to(memory_format=torch.channels_last)
    opt = sgd(model)
    target = AutocastModel(model, device.type) if on_cuda else model
    opts = {"backend": cfg.compile_backend, "dynamic": False}

    def our_batch(i: int) -> None:
        x, y = x_all[i * batch : (i + 1) * batch], y_all[i * batch : (i + 1) * batch]
        x = x.contiguous(memory_format=torch.channels_last)
        model.eval()  # the attack runs in eval mode (frozen BN statistics), as afs.attacks.PGD does
        x_adv = pgd_loop(target, x, y, random_start(x, EPS, seed=cfg.seed + i), EPS, ALPHA, cfg.steps, compile=opts)
        model.train()
        with _autocast(device):
            loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with rec.guard("compiled_bf16_channels_last"):
        compile_s = first_call_seconds(lambda: our_batch(0), device)
        for i in range(cfg.warmup):
            our_batch(i % n_batches)
        t = measure(lambda: [our_batch(i) for i in range(n_batches)], device, warmup=0, reps=1)
        ours_s = t.median_s * cfg.epoch_images / images
        # Without a measured baseline (it failed, and says so above) the row is its own baseline.
        name, ratio = ("authors_eager_fp32", base_s / ours_s) if base_s else ("compiled_bf16_channels_last", 1.0)
        rec.add("compiled_bf16_channels_last", baseline=name, ratio=ratio, ratio_meaning=SPEEDUP,
                metric="epoch_time", value=ours_s, unit="s/epoch", timing=t, batch_size=batch, model=cfg.model,
                dtype=_fast_dtype(device), shapes=shapes, compile_s=compile_s,
                extra={"batches_timed": n_batches, "compute_bound_s": bound_s, "time_over_bound": ours_s / bound_s,
                       "issue_bound_s": ISSUE_AT_EPOCH_BOUND_S, "flops_per_image": per_image,
                       "achieved_tflops": cfg.epoch_images * per_image / ours_s / 1e12})
    del x_all, y_all, model, opt, target
    _release(device)


# --------------------------------------------------------------------------------------------------------
# Suite 5: the merger-head kernel against the unfused path
# --------------------------------------------------------------------------------------------------------
def suite_merger_head(cfg: BenchConfig, rec: Recorder) -> None:
    """Fused BN-affine + ReLU + pool + concat + linear (forward; forward + backward to F, W, b) vs unfused."""
    device = cfg.torch_device()
    _, widen = parse_model(cfg.model)
    channels, side = 64 * widen, cfg.image_size // 4  # the WRN's last feature map: (B, 64k, S/4, S/4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what autocast hands the head on GPU
    gen = torch.Generator().manual_seed(cfg.seed)
    bns = []
    for _ in range(cfg.members):
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.running_mean.normal_(0.0, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bns.append(bn.to(device).eval().requires_grad_(False))
    weight = (0.01 * torch.randn(cfg.num_classes, cfg.members * channels, generator=gen)).to(device).requires_grad_(True)
    bias = torch.zeros(cfg.num_classes, device=device, requires_grad=True)

    def unfused(fmaps: list[torch.Tensor]) -> torch.Tensor:
        # The unfused composition (StackedModel's CPU path): each final BN -> ReLU -> mean, concat, Linear.
        with _autocast(device):
            feats = torch.cat([F.relu(bn(f)).mean(dim=(2, 3)) for f, bn in zip(fmaps, bns)], dim=1)
            return F.linear(feats, weight, bias)

    def fused(fmaps: list[torch.Tensor]) -> torch.Tensor:
        return merger_head(fmaps, bns, weight, bias, backend="triton")

    compiled_unfused = torch.compile(unfused, backend=cfg.compile_backend, dynamic=False)

    for batch in cfg.batch_sizes:
        with rec.guard(f"B={batch}"):
            _merger_head_batch(cfg, rec, device, batch, dtype, gen, unfused, compiled_unfused, fused, weight, bias)
        _release(device)


def _merger_head_batch(
    cfg: BenchConfig,
    rec: Recorder,
    device: torch.device,
    batch: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    unfused: Callable[[list[torch.Tensor]], torch.Tensor],
    compiled_unfused: Callable[[list[torch.Tensor]], torch.Tensor],
    fused: Callable[[list[torch.Tensor]], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> None:
    """The three heads at one batch size, forward and forward + backward; unfused eager is the baseline."""
    channels, side = weight.shape[1] // cfg.members, cfg.image_size // 4
    warmup, reps = _cheap_reps(cfg, device, 10)
    fmaps = [
        torch.randn(batch, channels, side, side, generator=gen).to(device=device, dtype=dtype)
        .contiguous(memory_format=torch.channels_last)  # the models run channels_last (afs.training)
        for _ in range(cfg.members)
    ]
    fmap_bytes = sum(f.numel() * f.element_size() for f in fmaps)
    shapes = {"fmaps": [list(f.shape) for f in fmaps], "weight": list(weight.shape)}
    fused_ok = _triton_runs(device, rec, f"B={batch} fused_triton")
    if fused_ok:
        with torch.no_grad():
            fused(fmaps)  # JIT-compiles the kernel: kept out of the timing
    g = torch.randn(batch, cfg.num_classes, generator=gen).to(device=device, dtype=dtype)

    for mode in ("forward", "forward_backward"):
        leaves = [f.detach().requires_grad_(mode == "forward_backward") for f in fmaps]

        def run(head: Callable[[list[torch.Tensor]], torch.Tensor], mode: str = mode, leaves: list = leaves) -> Any:
            if mode == "forward":
                with torch.no_grad():
                    return head(leaves)
            out = head(leaves)
            return torch.autograd.grad(out, [*leaves, weight, bias], g.to(out.dtype))

        # Traffic: the forward reads every map once; the backward reads them again and writes dF.
        traffic = fmap_bytes * (1 if mode == "forward" else 3)
        t_eager = measure(lambda: run(unfused), device, warmup=warmup, reps=reps)
        comp_s, t_comp = _compiled(lambda: run(compiled_unfused), device, warmup, reps)
        results: dict[str, tuple[Timing, float | None]] = {
            "unfused_eager": (t_eager, None),
            "unfused_compiled": (t_comp, comp_s),
        }
        if fused_ok:
            results["fused_triton"] = (measure(lambda: run(fused), device, warmup=warmup, reps=reps), None)
        best_unfused = min(t_eager.median_ms, results["unfused_compiled"][0].median_ms)
        for case, (t, comp) in results.items():
            more: dict[str, Any] = {"mode": mode, "effective_GBps": traffic / t.median_s / 1e9, "traffic_bytes": traffic,
                                    "fits_in_l2": _fits_in_l2(device, fmap_bytes)}
            if case == "fused_triton":
                more["speedup_vs_unfused_compiled"] = results["unfused_compiled"][0].median_ms / t.median_ms
                more["wins"] = t.median_ms < best_unfused  # keep the kernel only where this holds
            rec.add(f"{case}_{mode}", baseline=f"unfused_eager_{mode}", ratio=t_eager.median_ms / t.median_ms,
                    ratio_meaning=SPEEDUP, metric="calls_per_s", value=1.0 / t.median_s, unit="calls/s", timing=t,
                    batch_size=batch, model=cfg.model, dtype=str(dtype).replace("torch.", ""), shapes=shapes,
                    compile_s=comp, extra=more)


# --------------------------------------------------------------------------------------------------------
# Suite 6: the cpu profile's network on the CPU, against torchattacks
# --------------------------------------------------------------------------------------------------------
CPU_MODEL = "smallcnn-2"  # afs.models.SmallCNN(widen_factor=2): the cpu profile's network, 32-32-64-64-128
CIFAR_SHAPE, CIFAR_CLASSES = (3, 32, 32), 10
AT_STEPS = 3  # the PGD-AT epoch's training attack (and the pre-training's): PGD-3 ...
AT_ALPHA = 2.5 * EPS / AT_STEPS  # ... with Madry et al.'s step 2.5 * eps / steps
TORCHATTACKS_PIN = "torchattacks==3.5.1"  # installed with --no-deps (its requests pin conflicts with jupyterlab)
STRENGTH = "ratio = (robust images + 1) / (baseline's robust images + 1): 1 = equal strength, < 1 = stronger attack"
_CL = torch.channels_last


@dataclass
class _CpuData:
    """The cpu suite's images, float [0, 1] NCHW on the CPU: training batches by index, evaluation batches."""

    source: str  # where they come from (printed, and stored in every row's extra)
    train_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    evals: list[tuple[torch.Tensor, torch.Tensor]]


def _cpu_data(cfg: BenchConfig) -> _CpuData:
    """Real data from ``cfg.data_root`` (afs.data) when given, else synthetic CIFAR-shaped classes."""
    b = cfg.cpu_batch_size
    n_train = max(cfg.cpu_train_steps, cfg.cpu_epoch_batches) * b
    n_eval = cfg.cpu_eval_batches * b
    if cfg.data_root is None:
        return _synthetic_cifar(cfg)
    train = load_dataset(cfg.dataset, cfg.data_root, "train")
    test = load_dataset(cfg.dataset, cfg.data_root, "test")
    if n_eval > len(test) or b > len(train):
        raise ValueError(f"cpu suite: batch {b} and {n_eval} evaluation images asked; {cfg.dataset} has "
                         f"{len(train)} training and {len(test)} test images")
    n_train = min(n_train, len(train) // b * b)  # more steps than images: the batches repeat
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    idx = balanced_subset(train.labels, n_train, seed=cfg.seed)[order]  # balanced, then shuffled
    n_batches = n_train // b

    def train_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = idx[(i % n_batches) * b : (i % n_batches + 1) * b]
        return train.images[j].float() / 255, train.labels[j]

    sub = test.subset(balanced_subset(test.labels, n_eval, seed=cfg.seed))
    x_eval = sub.images.float() / 255
    evals = [(x_eval[i * b : (i + 1) * b], sub.labels[i * b : (i + 1) * b]) for i in range(cfg.cpu_eval_batches)]
    return _CpuData(f"{cfg.dataset} (train: {n_train} images, balanced; eval: {n_eval} test images, balanced)",
                    train_batch, evals)


def _synthetic_cifar(cfg: BenchConfig) -> _CpuData:
    """Ten classes, each a random 4x4 colour pattern upsampled to 32x32, plus Gaussian pixel noise: learnt in a
    few dozen steps, so the strength rows attack a model that gets clean images right. It says nothing about
    CIFAR; rows made on it compare the variants with each other only (pass ``data_root`` for real images)."""
    b, base = cfg.cpu_batch_size, 1_000_000 * (cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    templates = F.interpolate(torch.rand(CIFAR_CLASSES, 3, 4, 4, generator=gen), size=CIFAR_SHAPE[1:],
                              mode="bilinear", align_corners=False)  # (10, 3, 32, 32)

    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, CIFAR_CLASSES, (b,), generator=g)
        return (templates[y] + 0.3 * torch.randn(b, *CIFAR_SHAPE, generator=g)).clamp(0.0, 1.0), y

    evals = [draw(base + 500_000 + i) for i in range(cfg.cpu_eval_batches)]
    return _CpuData("synthetic (class templates + noise; not CIFAR)", lambda i: draw(base + i), evals)


def _torchattacks(rec: Recorder) -> Any:
    """The torchattacks module, or None with one line saying so (the suite then runs without its rows)."""
    try:
        import torchattacks
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install: either way no baseline
        rec.note(f"torchattacks unavailable ({type(e).__name__}: {e}); install it with `pip install --no-deps "
                 f"{TORCHATTACKS_PIN}`. Its rows are skipped; ratios are against ours_eager_fp32")
        return None
    return torchattacks


def _at_step(net: nn.Module, *, bf16: bool, channels_last: bool, compile_backend: str | None,
             seed: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """One PGD-AT batch as afs.training runs it: PGD-3 on ``net`` (afs.attacks.PGD puts it in eval mode and
    back), then one SGD step on the adversarial batch in train mode. ``bf16``: attack and training forward
    under bf16 autocast; ``compile_backend``: the attack's steps torch.compile'd (the weight update stays eager)."""
    target = AutocastModel(net, "cpu") if bf16 else net
    attack = PGD(target, eps=EPS, step_size=AT_ALPHA, steps=AT_STEPS,
                 compile=False if compile_backend is None else {"backend": compile_backend})
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=_CL)
        net.train()
        x_adv = attack(x, y, seed=seed + i)  # Eq. 4, in eval mode (frozen BN statistics)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def suite_cpu(cfg: BenchConfig, rec: Recorder) -> None:
    """The cpu profile's SmallCNN on the CPU: PGD-k speed and strength against torchattacks, and a PGD-AT epoch.

    1. PGD-``steps`` (eps 8/255, step 2/255, uniform random start) images/s at ``cpu_batch_size``:
       torchattacks fp32 NCHW [the baseline], ``afs.attacks.PGD`` fp32 eager NCHW, bf16 autocast +
       channels_last (``afs.runs.AutocastModel``), and that compiled (``PGD(compile=True)``; first call timed
       apart, with the calls it takes to pay for itself against the eager bf16 loop).
    2. Strength: every variant attacks the same ``cpu_eval_batches`` batches of the same trained model; each
       row is the robust accuracy its examples leave, scored by the fp32 eager NCHW model, with the paired
       difference to the baseline and its 95% bootstrap interval over images (afs.evidence) -- "within
       noise" is read there. The model is first trained ``cpu_train_steps`` PGD-AT steps (bf16 eager, on
       ``data_root`` or synthetic data), so accuracies are not trivially 0 or 100; it is a means to compare
       the variants, not a robustness result. torchattacks is seeded with ``torch.manual_seed(seed + i)`` and
       ours with a generator of the same seed, which draws the same uniforms: the fp32 rows start from the
       same points (tests/test_bench.py checks the two attacks then agree to 1e-6), so a difference between
       them is the loops', not the starts'.
    3. ``cpu_epoch_batches`` PGD-AT batches (PGD-3, step 2.5 * eps / 3, SGD) from the trained weights: fp32
       eager [baseline], bf16 + channels_last, and with the attack compiled; seconds and images/s.

    Threads: whatever torch uses (set OMP_NUM_THREADS); every row's env records ``torch_threads``. Compile
    times are cold only with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``); the AT
    epoch's attack is the pgd row's graph again, so its first call reuses those kernels.
    """
    if torch.device(cfg.device).type != "cpu":
        rec.note(f"skipped: the cpu suite measures the CPU; run it with --device cpu (this run: {cfg.device})")
        return
    device = torch.device("cpu")
    b, k = cfg.cpu_batch_size, cfg.steps
    ta = _torchattacks(rec)
    try:
        data = _cpu_data(cfg)
    except (FileNotFoundError, ValueError) as e:  # a wrong --data-root: said in one line, a non-zero exit
        rec.failures.append(f"data: {e}")
        rec.note(f"FAILED data: {e}")
        return
    skipped: list[str] = [] if cfg.cpu_compile else ["*_compiled_bf16_channels_last (cpu_compile is off)"]
    if ta is None:
        skipped += ["pgd_torchattacks_fp32", "strength_torchattacks_fp32"]

    # The attacked model: SmallCNN(2), trained briefly with PGD-AT (the fast eager configuration).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = SmallCNN(widen_factor=2, num_classes=CIFAR_CLASSES).to(memory_format=_CL)
    if cfg.cpu_train_steps:
        train = _at_step(net, bf16=True, channels_last=True, compile_backend=None, seed=cfg.seed)
        t0 = time.perf_counter()
        for i in range(cfg.cpu_train_steps):
            train(*data.train_batch(i), i)
        train_s = time.perf_counter() - t0
        rec.note(f"model {CPU_MODEL} trained {cfg.cpu_train_steps} PGD-AT steps (bf16 channels_last) at B={b} on "
                 f"{data.source} in {train_s:.0f} s")
    model = copy.deepcopy(net).to(memory_format=torch.contiguous_format).eval()  # fp32 NCHW: (a), (b), scoring
    fast = AutocastModel(copy.deepcopy(net).to(memory_format=_CL).eval(), "cpu")  # (c), (d): same weights
    with torch.no_grad():
        clean = torch.cat([model(x).argmax(1) == y for x, y in data.evals])
    rec.note(f"clean accuracy on the {clean.numel()} evaluation images: {100 * clean.float().mean():.1f}%")

    # The PGD-k variants, each ``run(x, y, i)`` -> x_adv, its random start seeded by the batch index i.
    variants: list[tuple[str, str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]]] = []
    if ta is not None:
        atk = ta.PGD(model, eps=EPS, alpha=ALPHA, steps=k, random_start=True)

        def run_ta(x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + i)  # torchattacks draws its start from torch's global RNG
                return atk(x, y)

        variants.append(("torchattacks_fp32", "float32", run_ta))
    ours = PGD(model, eps=EPS, step_size=ALPHA, steps=k)
    variants.append(("ours_eager_fp32", "float32", lambda x, y, i: ours(x, y, seed=cfg.seed + i)))
    ours_bf16 = PGD(fast, eps=EPS, step_size=ALPHA, steps=k)
    variants.append(("ours_bf16_channels_last", "bfloat16-autocast",
                     lambda x, y, i: ours_bf16(x.contiguous(memory_format=_CL), y, seed=cfg.seed + i)))
    if cfg.cpu_compile:
        ours_comp = PGD(fast, eps=EPS, step_size=ALPHA, steps=k, compile={"backend": cfg.compile_backend})
        variants.append(("ours_compiled_bf16_channels_last", "bfloat16-autocast",
                         lambda x, y, i: ours_comp(x.contiguous(memory_format=_CL), y, seed=cfg.seed + i)))
    shapes = {"x": [b, *CIFAR_SHAPE], "steps": k, "eps": EPS, "alpha": ALPHA}

    # 1. Speed, on the first evaluation batch (speed does not depend on the pixels).
    x0, y0 = data.evals[0]
    times: dict[str, Timing] = {}
    for name, dtype, run in variants:
        with rec.guard(f"pgd_{name}"):
            fn = lambda run=run: run(x0, y0, 0)  # noqa: E731
            compile_s = first_call_seconds(fn, device) if "compiled" in name else None
            t = times[name] = measure(fn, device, warmup=cfg.warmup, reps=cfg.reps)
            base = next(iter(times))  # the first variant measured: torchattacks when it is there
            more: dict[str, Any] = {"memory_format": "channels_last" if "channels_last" in name else "contiguous"}
            eager = times.get("ours_bf16_channels_last")
            if compile_s is not None and eager is not None:
                saved = eager.median_s - t.median_s  # per call, against the same loop uncompiled
                per_epoch = cfg.epoch_images // b
                more.update(vs="ours_bf16_channels_last", saved_s_per_call=saved, calls_per_epoch=per_epoch,
                            break_even_calls=compile_s / saved if saved > 0 else None,
                            pays_off_within_one_epoch=saved > 0 and compile_s < per_epoch * saved)
            rec.add(f"pgd_{name}", baseline=f"pgd_{base}", ratio=times[base].median_ms / t.median_ms,
                    ratio_meaning=SPEEDUP, metric="images_per_s", value=b / t.median_s, unit="images/s",
                    timing=t, batch_size=b, model=CPU_MODEL, dtype=dtype, shapes=shapes, compile_s=compile_s,
                    extra=more)

    # 2. Strength: the same batches, the same model; every x_adv scored by the fp32 eager NCHW model.
    flags: dict[str, torch.Tensor] = {}
    boot = Bootstrap(clean.numel(), seed=cfg.seed)
    for name, dtype, run in variants:
        with rec.guard(f"strength_{name}"):
            ok, worst, in_box = [], 0.0, True
            for i, (x, y) in enumerate(data.evals):
                x_adv = run(x, y, i)
                worst = max(worst, (x_adv - x).abs().max().item())
                in_box = in_box and bool(x_adv.min() >= 0) and bool(x_adv.max() <= 1)
                with torch.no_grad():
                    ok.append(model(x_adv).argmax(1) == y)
            f = flags[name] = torch.cat(ok)
            base = next(iter(flags))
            pair = boot.means(torch.stack([f, flags[base]], 1).float().numpy())  # (n_boot, 2), the same resamples
            rec.add(f"strength_{name}", baseline=f"strength_{base}",
                    ratio=(f.sum().item() + 1) / (flags[base].sum().item() + 1), ratio_meaning=STRENGTH,
                    metric="robust_accuracy", value=100 * f.float().mean().item(), unit="% robust (fp32 score)",
                    timing=None, batch_size=b, model=CPU_MODEL, dtype=dtype,
                    shapes={**shapes, "images": f.numel()},
                    extra={"images": f.numel(), "clean_accuracy": 100 * clean.float().mean().item(),
                           "diff_vs_baseline_pp": 100 * (f.float().mean() - flags[base].float().mean()).item(),
                           "diff_interval_95_pp": percentile_interval(pair[:, 0] - pair[:, 1]),
                           "same_flags_as_baseline": (f == flags[base]).float().mean().item(),
                           "max_linf_over_eps": worst / EPS, "in_box": in_box,
                           "scored_by": "fp32 eager NCHW model", "data": data.source,
                           "model_pgd_at_steps": cfg.cpu_train_steps})

    # 3. A PGD-AT epoch of cpu_epoch_batches batches, each variant from a copy of the trained weights.
    n = cfg.cpu_epoch_batches
    batches = [data.train_batch(i) for i in range(n)]
    at: list[tuple[str, bool, str | None]] = [("at_eager_fp32", False, None), ("at_bf16_channels_last", True, None)]
    if cfg.cpu_compile:
        at.append(("at_compiled_bf16_channels_last", True, cfg.compile_backend))
    at_times: dict[str, Timing] = {}
    at_shapes = {"x": [b, *CIFAR_SHAPE], "batches": n, "attack_steps": AT_STEPS, "eps": EPS, "alpha": AT_ALPHA}
    for case, fast_path, backend in at:
        with rec.guard(case):
            net_v = copy.deepcopy(net).to(memory_format=_CL if fast_path else torch.contiguous_format)
            step = _at_step(net_v, bf16=fast_path, channels_last=fast_path, compile_backend=backend, seed=cfg.seed)
            # The first batch is a warm-up (oneDNN primitive caches; for the compiled case: the compile).
            first_s = first_call_seconds(lambda step=step: step(*batches[0], 0), device)
            t = at_times[case] = measure(lambda step=step: [step(x, y, i) for i, (x, y) in enumerate(batches)],
                                         device, warmup=0, reps=1)
            base = next(iter(at_times))
            more = {"images": n * b, "images_per_s": n * b / t.median_s, "first_batch_s": first_s,
                    "epoch_s_extrapolated": t.median_s / (n * b) * cfg.epoch_images, "epoch_images": cfg.epoch_images}
            eager = at_times.get("at_bf16_channels_last")
            if backend is not None and eager is not None:
                saved = (eager.median_s - t.median_s) / n  # per batch
                per_epoch = cfg.epoch_images // b
                more.update(vs="at_bf16_channels_last", saved_s_per_batch=saved, batches_per_epoch=per_epoch,
                            break_even_batches=first_s / saved if saved > 0 else None,
                            pays_off_within_one_epoch=saved > 0 and first_s < per_epoch * saved,
                            compiled="the attack's steps (afs.attacks.PGD compile=True); the weight update is eager",
                            compile_note="the attack is the pgd row's graph: its compile reuses those Inductor kernels")
            rec.add(case, baseline=base, ratio=at_times[base].median_ms / t.median_ms, ratio_meaning=SPEEDUP,
                    metric="at_epoch_time", value=t.median_s, unit=f"s per {n} batches", timing=t, batch_size=b,
                    model=CPU_MODEL, dtype="bfloat16-autocast" if fast_path else "float32", shapes=at_shapes,
                    compile_s=first_s if backend is not None else None, extra=more)

    made = [r["case"] for r in rec.rows if r["run_id"] == rec.run_id]
    rec.note(f"rows: {', '.join(made)}" + (f"; not run: {', '.join(skipped)}" if skipped else ""))


SUITES: dict[str, Callable[[BenchConfig, Recorder], None]] = {
    "pgd_step": suite_pgd_step,
    "merger_head": suite_merger_head,
    "stack": suite_stack,
    "pgd": suite_pgd,
    "at_epoch": suite_at_epoch,
    "cpu": suite_cpu,
}
