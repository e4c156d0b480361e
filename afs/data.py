"""Data: CIFAR-10/100 and the offline JPEG copy of CIFAR-10, train/val splits, and an on-device loader.

Every source gives an `ImageData` (uint8 images ``(N, 3, 32, 32)`` + int64 labels): ``cifar10`` /
``cifar100`` through ``torchvision.datasets``; ``cifar10-jpeg``, CIFAR-10 as JPEG (quality ~75, 4:2:0:
accuracies close to, not equal to, the originals'), from ``cifar10-jpeg.tar.gz`` or its extracted
folder, decoded once (``torchvision.io.decode_jpeg``, or PIL once torchvision drops it: the same
libjpeg-turbo pixels) and cached per split. Splits only see training labels (no test leak into
validation). `DeviceLoader` keeps uint8 data on the device and seeds each epoch for exact resumes.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from afs.io import CorruptFileError, atomic_torch_save, derive_seed, tensor_hash
from afs_kernels import Choice

__all__ = ["DATASETS", "CIFAR10_CLASSES", "DATA_ENV", "CACHE_ENV", "DatasetName", "Split", "ImageData",
           "resolve_data_root", "resolve_cache_dir", "load_dataset", "train_val_split", "balanced_subset",
           "crop_flip", "DeviceLoader"]

DATA_ENV = "AFS_DATA"  # folder holding the data sets when no root is passed
CACHE_ENV = "AFS_CACHE"  # folder for decoded-JPEG caches when no cache_dir is passed


class DatasetName(Choice):
    """The data sets `load_dataset` knows; ``DatasetName("CIFAR10")`` works too."""
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    CIFAR10_JPEG = "cifar10-jpeg"  # the offline JPEG copy of CIFAR-10


class Split(Choice):
    """Which half of a data set; ``Split("TEST")`` works too."""
    TRAIN = "train"
    TEST = "test"


DATASETS: tuple[str, ...] = tuple(d.value for d in DatasetName)
# torchvision's order (batches.meta of the original CIFAR-10); labels are indices into this tuple.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_INDEX = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W) of every CIFAR image
JPEG_FOLDER = "cifar10-jpeg"  # top folder of the JPEG copy (inside the archive too)
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
_CACHE_FORMAT = 2  # part of the cache key: bump when the payload or the decoding changes


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held as two tensors, validated on construction."""
    images: Tensor  # uint8 (N, 3, 32, 32), 0..255 (the float [0, 1] copy is made per batch)
    labels: Tensor  # int64 (N,), indices into `classes`
    classes: tuple[str, ...]  # class names in label order (torchvision's order for CIFAR)
    name: str  # data set name, e.g. "cifar10-jpeg"
    split: str  # "train" | "test", or a caller's name for a derived subset such as "val"

    def __post_init__(self) -> None:
        x, y, classes = self.images, self.labels, self.classes
        if not (isinstance(x, Tensor) and x.dtype == torch.uint8):
            raise TypeError(f"ImageData.images must be a uint8 tensor (0..255), got {_describe(x)}")
        if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"ImageData.images must have shape (N, 3, 32, 32), got {tuple(x.shape)}")
        if not (isinstance(y, Tensor) and y.dtype == torch.int64):
            raise TypeError(f"ImageData.labels must be an int64 tensor, got {_describe(y)}")
        if y.shape != (len(x),) or y.device != x.device:
            raise ValueError(f"labels must have shape ({len(x)},) on {x.device}, got {tuple(y.shape)} on {y.device}")
        if isinstance(classes, str) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"ImageData.classes must be a non-empty sequence of str, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"ImageData.classes has duplicates: {tuple(classes)}")
        object.__setattr__(self, "classes", tuple(classes))  # a list is stored as a tuple
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes) - 1}], got [{int(y.min())}, {int(y.max())}]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={len(self.classes)}, device={self.images.device})")

    def subset(self, indices: Tensor | Sequence[int], split: str | None = None) -> ImageData:
        """The images at `indices` (in that order); `split` renames the result (e.g. ``"val"``)."""
        idx = _int_vector(indices, "subset indices", below=len(self)).to(self.images.device)
        return ImageData(self.images[idx], self.labels[idx], self.classes, self.name,
                         self.split if split is None else split)

    @functools.cached_property
    def sha(self) -> str:
        """Content hash of the images and labels (16 hex digits): the identity of the data a stage read."""
        return tensor_hash(self.images, self.labels)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: `root` if given, else ``$AFS_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get(DATA_ENV) or "data").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder for decoded JPEGs: `cache_dir` if given, else ``$AFS_CACHE``, else ``~/.cache/afs``."""
    return Path(cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or "~/.cache/afs").expanduser()


def load_dataset(name: str | DatasetName, root: str | os.PathLike | None = None, split: str | Split = "train", *,
                 download: bool = False, cache_dir: str | os.PathLike | None = None) -> ImageData:
    """One split of a data set as uint8 tensors on the CPU.

    `root` holds ``cifar-10-batches-py`` / ``cifar-100-python``, or ``cifar10-jpeg/``, ``cifar10-jpeg.tar.gz``
    or directly ``train/`` and ``test/``; `download` lets torchvision fetch CIFAR (never implied). Errors
    name the file: ValueError (malformed), FileNotFoundError (with where it looked, how to fix it),
    `afs.io.CorruptFileError` (a damaged archive)."""
    dataset = DatasetName.parse(name, "dataset")  # ValueError naming the valid ones
    part = Split.parse(split, "split (train_val_split makes a validation set)")
    origin = ("the root argument" if root is not None else f"${DATA_ENV}" if os.environ.get(DATA_ENV)
              else f"the default ./data (neither a root argument nor ${DATA_ENV} was given)")
    if dataset is not DatasetName.CIFAR10_JPEG:
        return _load_torchvision_cifar(dataset, resolve_data_root(root), part, download, origin)
    if download:
        raise ValueError("cifar10-jpeg is an offline copy and cannot be downloaded (use 'cifar10' with download=True)")
    return _load_cifar10_jpeg(resolve_data_root(root), part, resolve_cache_dir(cache_dir), origin)


def _load_torchvision_cifar(dataset: DatasetName, root: Path, split: Split, download: bool, origin: str) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100  # here: torchvision.datasets is a heavy import

    cls = CIFAR10 if dataset is DatasetName.CIFAR10 else CIFAR100
    hint = f"; or use 'cifar10-jpeg' ({JPEG_ARCHIVE}), the offline copy" if cls is CIFAR10 else " (no offline copy)"
    try:
        tv = cls(root=str(root), train=split is Split.TRAIN, download=download)
    except RuntimeError as err:  # torchvision's only signal for absent or damaged files
        if "not found or corrupted" not in str(err):
            raise
        raise FileNotFoundError(
            f"{dataset.value}: files missing or failing torchvision's MD5 check in {root.absolute() / cls.base_folder} "
            f"(data root from {origin}). To fix: pass download=True with a network; or point ${DATA_ENV} / "
            f"--data-root at a folder holding '{cls.base_folder}'{hint}.") from None
    # torchvision keeps NHWC uint8 numpy (N, 32, 32, 3); every torch model expects NCHW.
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return ImageData(images, torch.as_tensor(tv.targets), tuple(tv.classes), dataset.value, split.value)


def _load_cifar10_jpeg(root: Path, split: Split, cache_dir: Path, origin: str) -> ImageData:
    """Find the JPEG copy, then read the cached tensors or decode and cache them."""
    extracted, direct, archive = root / JPEG_FOLDER / split.value, root / split.value, root / JPEG_ARCHIVE
    folder = extracted if extracted.is_dir() else direct if direct.is_dir() else None
    if folder is None and not archive.is_file():
        raise FileNotFoundError(
            f"cifar10-jpeg ({split.value} split) not found under data root {root.absolute()} (from {origin}). "
            f"Looked at:\n  - {extracted.absolute()}/  (the extracted archive)\n  - {direct.absolute()}/  (class "
            f"folders directly)\n  - {archive.absolute()}\nTo fix: point ${DATA_ENV} (or --data-root, or the root "
            "argument) at the folder that holds one of them.")
    # The cache key hashes the source's bytes: the archive file (20 MB, ~0.02 s), or a folder image by
    # image. A folder is read and checked on every load, an archive only when the cache misses.
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{split.value}|".encode())
    files = _read_jpegs(folder, split) if folder else None
    for label, name, _, blob in files or [(-1, JPEG_ARCHIVE, "", archive.read_bytes())]:  # an archive: one blob
        key.update(f"|{label}/{name}:{len(blob)}|".encode() + blob)
    cache = cache_dir / f"{JPEG_FOLDER}-{split.value}-{key.hexdigest()[:20]}.pt"
    if cache.is_file():
        try:
            images, labels = torch.load(cache, map_location="cpu", weights_only=True)  # the pair saved below
            return ImageData(images, labels, CIFAR10_CLASSES, JPEG_FOLDER, split.value)
        except Exception as err:  # truncated, not a torch file, wrong contents: all mean "decode again"
            why = (str(err).splitlines() or [type(err).__name__])[0]
            warnings.warn(f"ignoring unreadable cache {cache} ({why}); decoding the JPEGs again", stacklevel=3)
    labels, _, names, blobs = zip(*(files or _read_jpegs(archive, split)))
    data = ImageData(_decode_jpegs(blobs, names), torch.tensor(labels), CIFAR10_CLASSES, JPEG_FOLDER, split.value)
    try:  # temp file + os.replace: a reader never sees half a cache
        atomic_torch_save((data.images, data.labels), cache)
    except OSError as err:  # the data are decoded and correct; only the next load gets slower
        warnings.warn(f"could not write the cache {cache} ({err}); the next load decodes again (set ${CACHE_ENV} "
                      "or cache_dir to a writable folder)", stacklevel=3)
    return data


def _read_jpegs(source: Path, split: Split) -> list[tuple[int, str, str, bytes]]:
    """Sorted (label, file name, path for messages, bytes) of ``<class>/*.jpg`` in a split folder or the
    archive's ``[cifar10-jpeg/]<split>/``: exactly the ten CIFAR-10 class folders (names = labels), none empty."""
    class_dirs, files, where = set(), [], str(source) if source.is_dir() else f"{source} ({split.value}/)"
    try:
        with contextlib.nullcontext() if source.is_dir() else tarfile.open(source, "r|*") as tar:
            if tar is None:  # (path parts under the split folder, bytes or None for a folder, path for messages)
                entries: Any = ((p.relative_to(source).parts, p.read_bytes() if p.is_file() else None, str(p))
                                for p in source.rglob("*"))
            else:  # a tar stream: each member is read when the loop below reaches it
                parts = ((m, [p for p in PurePosixPath(m.name).parts if p not in (".", "/")]) for m in tar)
                parts = ((m, p[1:] if p[:1] == [JPEG_FOLDER] else p) for m, p in parts)  # the top folder is optional
                entries = ((p[1:], tar.extractfile(m).read() if m.isfile() else None, f"{source}:{m.name}")
                           for m, p in parts if len(p) > 1 and p[0] == split.value)
            for parts, blob, path in entries:
                if any(p.startswith(".") for p in parts):
                    continue  # .DS_Store and friends
                class_dirs.add(parts[0])
                if len(parts) == 2 and blob is not None and parts[1].lower().endswith((".jpg", ".jpeg")):
                    if parts[0] in _CIFAR10_INDEX:  # unknown classes are reported all at once below
                        files.append((_CIFAR10_INDEX[parts[0]], parts[1], path, blob))
                elif len(parts) != 1 or blob is not None:  # anything but a class folder
                    raise ValueError(f"unexpected entry {path}: {where} should hold only <class>/<name>.jpg")
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise CorruptFileError(source, f"a damaged or truncated archive: {err}", "Copy the archive again from "
                               "where it came from; the decoded cache is rebuilt from it") from None
    expected = f"expected exactly the ten CIFAR-10 classes: {', '.join(CIFAR10_CLASSES)}"
    if unknown := sorted(class_dirs - set(CIFAR10_CLASSES)):
        raise ValueError(f"unknown class folder(s) {unknown} in {where}; {expected}")
    if missing := [c for c in CIFAR10_CLASSES if c not in class_dirs]:
        raise FileNotFoundError(f"missing class folder(s) {missing} in {where}; {expected}")
    if empty := [c for i, c in enumerate(CIFAR10_CLASSES) if i not in {f[0] for f in files}]:
        raise ValueError(f"class folder(s) {empty} in {where} hold no JPEG images")  # a broken copy, not a small one
    return sorted(files)  # by class (torchvision's order), then file name: the order of the tensor


def _decode_jpegs(blobs: Sequence[bytes], names: Sequence[str], *, use_torchvision: bool | None = None) -> Tensor:
    """Decode JPEG bytes into one uint8 ``(N, 3, 32, 32)`` tensor; a bad image is named in the error."""
    import torchvision.io as tvio
    if use_torchvision is None:
        use_torchvision = hasattr(tvio, "decode_jpeg")  # deprecated in torchvision 0.29, to be removed

    def decode(batch: Sequence[bytes]) -> list[Tensor]:  # each (3, H, W) uint8; grey JPEGs become RGB
        if use_torchvision:  # bytearray: writable, so frombuffer does not warn
            return tvio.decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch],
                                    mode=tvio.ImageReadMode.RGB)
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        pil = [Image.open(io.BytesIO(b)) for b in batch]
        if other := [img.format for img in pil if img.format != "JPEG"]:
            raise ValueError(f"not a JPEG file (PIL reads it as {other[0]})")
        return [pil_to_tensor(img.convert("RGB")) for img in pil]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's codec deprecation, see above
        try:
            images = decode(blobs)
        except Exception:  # libjpeg / PIL errors come in many types; decode one by one to name the file
            for blob, name in zip(blobs, names):
                try:
                    decode([blob])
                except Exception as err:
                    raise ValueError(f"cannot decode {name} as a JPEG image: {err}") from None
            raise
    for img, name in zip(images, names):
        if tuple(img.shape) != IMAGE_SHAPE:
            raise ValueError(f"{name} decodes to {img.shape[1]}x{img.shape[2]} pixels (C={img.shape[0]}), not 3x32x32")
    return torch.stack(images)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """TypeError unless `value` is an int (not a bool), ValueError unless ``lo <= value <= hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else "non-negative" if lo == 0 else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _int_vector(x: Tensor | Sequence[int], what: str, below: int | None = None) -> Tensor:
    """`x` as a 1-D int64 CPU tensor of entries >= 0 (and < `below` if given)."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(list(x)) if len(x) else torch.zeros(0, dtype=torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what} must be integers, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.int64)
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, -1)
    if lo < 0 or (below is not None and hi >= below):
        bound = "be non-negative" if below is None else f"lie in [0, {below - 1}]"
        raise ValueError(f"{what} must {bound}, got [{lo}, {hi}]")
    return t


def _stratified_pick(y: Tensor, k: int, seed: int) -> Tensor:
    """Sorted indices of `k` samples spread evenly over the classes of `y`, random within each class."""
    gen, counts = torch.Generator().manual_seed(seed), torch.bincount(y)
    # Water filling: classes too small for an equal share give all they have and the rest is shared
    # again; the last ``remaining mod (open classes)`` go to seeded random classes, not the first ones.
    quota, remaining = torch.zeros_like(counts), k
    while remaining > 0:
        open_classes = (quota < counts).nonzero().flatten()
        share = remaining // len(open_classes)
        if share == 0:
            quota[open_classes[torch.randperm(len(open_classes), generator=gen)[:remaining]]] += 1
            break
        add = torch.clamp(counts[open_classes] - quota[open_classes], max=share)
        quota[open_classes] += add
        remaining -= int(add.sum())
    members = [(y == cls).nonzero().flatten() for cls in range(len(counts))]  # in class order, as drawn
    picked = [m[torch.randperm(len(m), generator=gen)[:q]] for m, q in zip(members, quota.tolist()) if q]
    return torch.cat([torch.zeros(0, dtype=torch.int64), *picked]).sort().values


def train_val_split(labels: Tensor | Sequence[int], val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sorted, disjoint, complete (train_idx, val_idx) of the *training* labels, stratified by class:
    `val_size` spread evenly over the classes as far as their sizes allow. Same arguments, same split."""
    y = _int_vector(labels, "labels")
    _check_int("val_size (train must stay non-empty)", val_size, 0, len(y) - 1)
    val_idx = _stratified_pick(y, val_size, derive_seed("train_val_split", seed))
    return torch.ones(len(y), dtype=torch.bool).index_fill_(0, val_idx, False).nonzero().flatten(), val_idx


def balanced_subset(labels: Tensor | Sequence[int], n: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a class-balanced subset of `n` samples; ``n=None`` or ``n >= len(labels)``: all."""
    y = _int_vector(labels, "labels")
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= len(y)):
        return torch.arange(len(y))
    _check_int("n", n, 0)
    # Another tag than train_val_split's: the same seed must not pick correlated samples.
    return _stratified_pick(y, n, derive_seed("balanced_subset", seed))


def crop_flip(images: Tensor, offset_y: Tensor, offset_x: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Batched random crop with zero padding + horizontal flip: ``out[b]`` is the window of ``pad(images[b])``
    at ``(offset_y[b], offset_x[b])`` (in ``[0, 2*padding]``; ``padding`` is the identity), mirrored where
    ``flip[b]``. One gather, any dtype (the loader's uint8 moves 4x less memory than float)."""
    if images.dim() != 4 or not offset_y.shape == offset_x.shape == flip.shape == images.shape[:1]:
        raise ValueError(f"crop_flip needs images (B, C, H, W) and offsets and flips (B,), got {tuple(images.shape)}, "
                         f"{tuple(offset_y.shape)}, {tuple(offset_x.shape)}, {tuple(flip.shape)}")
    b, c, h, w = images.shape
    padded, dev = F.pad(images, (padding,) * 4), images.device  # (B, C, H+2p, W+2p), zeros outside
    rows = offset_y.to(dev, torch.int64)[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offset_x.to(dev, torch.int64)[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip.to(dev, torch.bool)[:, None], cols.flip(1), cols)  # mirrored window columns
    bi, ci = torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


class DeviceLoader:
    """Mini-batches from uint8 images kept on one device; yields ``(x float32 in [0,1], y int64)``.

    The images move to `device` once (CIFAR-10 train is 150 MiB); a batch is a gather, optional crop +
    flip on uint8, and ``/255``. Epoch e's permutation, crops and flips come from a CPU generator (the
    same stream on every device) seeded by hash(seed, e): epoch e is the same whatever ran before, so
    call ``set_epoch(e)`` each epoch (as with ``DistributedSampler``) to resume exactly after a kill;
    ``iter(loader)`` uses the current epoch and advances it. Crops and flips are drawn per position of
    the global permutation: independent of batch size and number of ranks. Rank r of w (DDP) takes
    ``perm[r::w]``; with `drop_last` each keeps ``N // w`` samples in full batches (equal step counts).
    """

    def __init__(self, images_uint8: Tensor, labels: Tensor, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 padding: int = 4, device: torch.device | str | None = None) -> None:
        if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise TypeError(f"images_uint8 must be a uint8 tensor (N, C, H, W), got {_describe(images_uint8)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images_uint8.shape[:1]:
            raise TypeError(f"labels must be an int64 tensor of shape ({len(images_uint8)},), got {_describe(labels)}")
        for name, value, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("padding", padding, 0)):
            _check_int(name, value, lo)
        _check_int(f"rank (world_size={world_size})", rank, 0, world_size - 1)
        self.device = torch.device(device) if device is not None else images_uint8.device
        self.images, self.labels = images_uint8.to(self.device), labels.to(self.device)  # moved once
        self.batch_size, self.rank, self.world_size, self.padding = batch_size, rank, world_size, padding
        self.shuffle, self.augment, self.drop_last, self.seed = bool(shuffle), bool(augment), bool(drop_last), int(seed)
        self.epoch = 0  # the epoch the next iteration uses

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (its order and augmentation are fixed by seed + epoch)."""
        _check_int("epoch", epoch, 0)
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        n, w, b = len(self.images), self.world_size, self.batch_size
        return (n // w) // b * b if self.drop_last else len(range(self.rank, n, w))

    def __len__(self) -> int:
        """Batches per epoch on this rank (with drop_last, num_samples is a multiple of the batch size)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Not a generator: the epoch is fixed (and advanced) when iter() is called, not at the first batch.
        n, epoch, self.epoch = len(self.images), self.epoch, self.epoch + 1
        gen = torch.Generator().manual_seed(derive_seed("DeviceLoader", self.seed, epoch))
        # Fixed draw order (permutation, offsets, flips): each a pure function of (seed, epoch).
        plan = (torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n))[None]  # (1, N)
        if self.augment:  # rows order, dy, dx in [0, 2p], flip (1 = mirror): (4, N)
            plan = torch.cat([plan, torch.randint(0, 2 * self.padding + 1, (2, n), generator=gen),
                              torch.randint(0, 2, (1, n), generator=gen)])
        # This rank's share, then one host-to-device copy per epoch; batches are device-side gathers.
        plan = plan[:, self.rank :: self.world_size][:, : self.num_samples].to(self.device, non_blocking=True)
        return map(self._batch, plan.split(self.batch_size, dim=1) if plan.shape[1] else ())

    def _batch(self, p: Tensor) -> tuple[Tensor, Tensor]:
        x = self.images[p[0]]  # (B, C, H, W) uint8; p is (1, B) or (4, B), see __iter__
        x = crop_flip(x, p[1], p[2], p[3], self.padding) if len(p) == 4 else x
        return x.float().div_(255.0), self.labels[p[0]]
