"""Data: CIFAR-10/100 and the offline JPEG copy of CIFAR-10, train/val splits, and an on-device loader.

Three sources, one result type (`ImageData`: uint8 images ``(N, 3, 32, 32)`` + int64 labels):

* ``cifar10`` / ``cifar100``: the canonical pickled batches through ``torchvision.datasets`` (downloaded
  only when ``download=True`` is passed).
* ``cifar10-jpeg``: the 60,000 CIFAR-10 images re-encoded as JPEG (quality ~75, 4:2:0), laid out
  ``cifar10-jpeg/{train,test}/<class>/NNNN.jpg``; read from the extracted folder or straight from
  ``cifar10-jpeg.tar.gz`` (no extraction to disk), decoded once, then cached as a uint8 tensor. JPEG is
  lossy: accuracies on it are close to, not equal to, those on the lossless originals.

Splitting is index-based (`train_val_split`, `balanced_subset`) and only ever sees training labels, so the
test set cannot leak into validation. `DeviceLoader` keeps the uint8 data on the accelerator and does
crop + flip augmentation as batched tensor ops, with per-epoch seeding so an interrupted run resumes
bit-exactly.

Decoder choice (measured on 2 CPU cores, the full 60,000 images): ``torchvision.io.decode_jpeg`` is about
twice as fast as PIL and gives identical pixels (same libjpeg-turbo), so it is used while torchvision
ships it; torchvision 0.29 deprecates its image codecs, so PIL (a declared dependency) takes over when
``decode_jpeg`` is gone. Either way the decode happens once per source; later loads read the cache.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "DATA_ENV",
    "CACHE_ENV",
    "DatasetName",
    "Split",
    "ImageData",
    "resolve_data_root",
    "resolve_cache_dir",
    "load_dataset",
    "train_val_split",
    "balanced_subset",
    "crop_flip",
    "DeviceLoader",
]

PathLike = Union[str, "os.PathLike[str]"]

DATA_ENV = "AFS_DATA"  # folder holding the data sets when no root is passed
CACHE_ENV = "AFS_CACHE"  # folder for decoded-JPEG caches when no cache_dir is passed


class DatasetName(str, Enum):
    """The data sets `load_dataset` knows. Accepts ``DatasetName("cifar10")`` or ``DatasetName.CIFAR10``."""

    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    CIFAR10_JPEG = "cifar10-jpeg"  # the offline JPEG copy of CIFAR-10

    @classmethod
    def _missing_(cls, value: object) -> DatasetName | None:
        # Case-insensitive lookup ("CIFAR10" works); anything else falls through to Enum's ValueError.
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None


class Split(str, Enum):
    """Which half of a data set. Accepts ``Split("train")`` or ``Split.TRAIN``."""

    TRAIN = "train"
    TEST = "test"

    @classmethod
    def _missing_(cls, value: object) -> Split | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None


DATASETS: tuple[str, ...] = tuple(d.value for d in DatasetName)

# torchvision's order (batches.meta of the original CIFAR-10); labels are indices into this tuple.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR10_INDEX = {name: i for i, name in enumerate(CIFAR10_CLASSES)}

IMAGE_SHAPE = (3, 32, 32)  # (C, H, W) of every CIFAR image
JPEG_FOLDER = "cifar10-jpeg"  # top folder of the JPEG copy (inside the archive too)
JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_CACHE_FORMAT = 1  # bump when the cache payload changes; it is part of the cache key


# ----------------------------------------------------------------------------------------------------
# The result type
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageData:
    """A labelled image set held as two tensors, validated on construction."""

    images: Tensor  # uint8 (N, 3, 32, 32), pixel values 0..255 (the float [0,1] copy is made per batch)
    labels: Tensor  # int64 (N,), indices into `classes`
    classes: tuple[str, ...]  # class names in label order (torchvision's order for CIFAR)
    name: str  # data set name, e.g. "cifar10-jpeg"
    split: str  # "train" | "test", or a caller's name for a derived subset such as "val"

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or not isinstance(self.labels, Tensor):
            raise TypeError(
                f"ImageData needs torch tensors, got images={type(self.images).__name__}, "
                f"labels={type(self.labels).__name__}"
            )
        if self.images.dtype != torch.uint8:
            raise TypeError(f"ImageData.images must be uint8 (0..255), got {self.images.dtype}")
        if self.images.dim() != 4 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"ImageData.images must have shape (N, 3, 32, 32), got {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64:
            raise TypeError(f"ImageData.labels must be int64, got {self.labels.dtype}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"ImageData.labels must have shape (N,) with N = {self.images.shape[0]} images, "
                f"got {tuple(self.labels.shape)}"
            )
        if self.labels.device != self.images.device:
            raise ValueError(f"images on {self.images.device} but labels on {self.labels.device}")
        # Lists are accepted for convenience but stored as a tuple so the dataclass stays hashable-ish.
        classes = tuple(self.classes) if not isinstance(self.classes, str) else ()
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"ImageData.classes must be a non-empty sequence of str, got {self.classes!r}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"ImageData.classes has duplicates: {classes}")
        object.__setattr__(self, "classes", classes)
        if self.labels.numel() > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(classes):
                raise ValueError(
                    f"labels must lie in [0, {len(classes) - 1}] ({len(classes)} classes), got [{lo}, {hi}]"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, device={self.images.device})"
        )

    def subset(self, indices: Tensor | Sequence[int], split: str | None = None) -> ImageData:
        """The images at `indices` (in that order); `split` renames the result (e.g. ``"val"``)."""
        idx = _as_index(indices, len(self), what="subset indices").to(self.images.device)
        return ImageData(
            images=self.images[idx],
            labels=self.labels[idx],
            classes=self.classes,
            name=self.name,
            split=self.split if split is None else split,
        )

    @functools.cached_property
    def sha(self) -> str:
        """Content hash of the images and labels (16 hex digits): the identity of the data a stage read."""
        from afs.io import tensor_hash

        return tensor_hash(self.images, self.labels)

    def class_counts(self) -> Tensor:
        """Images per class, int64 ``(len(classes),)``."""
        return torch.bincount(self.labels.cpu(), minlength=len(self.classes))


# ----------------------------------------------------------------------------------------------------
# Where the data lives
# ----------------------------------------------------------------------------------------------------


def resolve_data_root(root: PathLike | None = None) -> Path:
    """The data folder: `root` if given, else ``$AFS_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV, "")
    return Path(env).expanduser() if env else Path("data")


def resolve_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """The cache folder for decoded JPEGs: `cache_dir` if given, else ``$AFS_CACHE``, else ``~/.cache/afs``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afs"


def _root_origin(root: PathLike | None) -> str:
    """How the data root was chosen, for error messages."""
    if root is not None:
        return "the root argument"
    if os.environ.get(DATA_ENV):
        return f"${DATA_ENV}"
    return f"the default ./data (neither a root argument nor ${DATA_ENV} was given)"


def _parse_name(name: str | DatasetName) -> DatasetName:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    try:
        return DatasetName(name)
    except ValueError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def _parse_split(split: str | Split) -> Split:
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    try:
        return Split(split)
    except ValueError:
        raise ValueError(
            f"unknown split {split!r}; valid splits: {', '.join(s.value for s in Split)} "
            "(make a validation set from 'train' with train_val_split)"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_dataset(
    name: str | DatasetName,
    root: PathLike | None = None,
    split: str | Split = "train",
    *,
    download: bool = False,
    cache_dir: PathLike | None = None,
) -> ImageData:
    """Load one split of a data set as uint8 tensors on the CPU.

    Args:
        name: one of `DATASETS`.
        root: folder holding the data (see `resolve_data_root`): for CIFAR the folder that holds
            ``cifar-10-batches-py`` / ``cifar-100-python``; for ``cifar10-jpeg`` the folder that holds
            ``cifar10-jpeg/`` or ``cifar10-jpeg.tar.gz`` (or directly ``train/`` and ``test/``).
        split: ``"train"`` or ``"test"``.
        download: let torchvision download CIFAR-10/100 into `root` (needs a network). Never implied.
        cache_dir: where ``cifar10-jpeg`` caches its decoded tensor (see `resolve_cache_dir`); unused
            by the pickled CIFAR sets, which load fast already.

    Raises:
        ValueError: unknown name or split; malformed JPEG folder (unknown class, bad image size, ...).
        FileNotFoundError: the data set is not where it was looked for (the message lists every path
            looked at and how to fix it), or a class folder is missing.
    """
    dataset = _parse_name(name)
    part = _parse_split(split)
    data_root = resolve_data_root(root)
    if dataset is DatasetName.CIFAR10_JPEG:
        if download:
            raise ValueError(
                "cifar10-jpeg is an offline copy and cannot be downloaded; pass download=False, or use "
                "name='cifar10' with download=True on a machine with a network"
            )
        images, labels = _load_cifar10_jpeg(data_root, part, resolve_cache_dir(cache_dir), _root_origin(root))
        classes: tuple[str, ...] = CIFAR10_CLASSES
    else:
        images, labels, classes = _load_torchvision_cifar(dataset, data_root, part, download, _root_origin(root))
    return ImageData(images=images, labels=labels, classes=classes, name=dataset.value, split=part.value)


def _load_torchvision_cifar(
    dataset: DatasetName, root: Path, split: Split, download: bool, origin: str
) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """CIFAR-10/100 through torchvision's own loader (MD5 checks included)."""
    # Imported here so `import afs.data` stays light (torchvision.datasets pulls in a lot).
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset is DatasetName.CIFAR10 else CIFAR100
    folder = (root / cls.base_folder).absolute()
    try:
        tv = cls(root=str(root), train=split is Split.TRAIN, download=download)
    except RuntimeError as err:
        # torchvision's only signal for absent or damaged files: "Dataset [metadata file] not found or
        # corrupted". Any other RuntimeError is a real bug and propagates unchanged.
        if "not found or corrupted" not in str(err):
            raise
        offline = (
            f"or, offline, use the dataset 'cifar10-jpeg' (the JPEG copy, {JPEG_ARCHIVE})"
            if dataset is DatasetName.CIFAR10
            else "(CIFAR-100 has no offline copy; it needs the original files)"
        )
        raise FileNotFoundError(
            f"{dataset.value}: files missing or failing torchvision's MD5 check in {folder} "
            f"(data root {root.absolute()} from {origin}). To fix: pass download=True on a machine with a "
            f"network; or point ${DATA_ENV} / --data-root at a folder holding '{cls.base_folder}'; {offline}."
        ) from None
    except OSError as err:
        if not download:
            raise
        # A failed download (no network: URLError, an OSError) gets the same advice as a missing set.
        raise OSError(
            f"downloading {dataset.value} into {root.absolute()} failed ({err}). Without a network, copy "
            f"'{cls.base_folder}' into {root.absolute()} by hand"
            + (f" or use 'cifar10-jpeg' with {JPEG_ARCHIVE}" if dataset is DatasetName.CIFAR10 else "")
        ) from err
    # torchvision keeps NHWC uint8 numpy (N, 32, 32, 3); we keep NCHW like every torch model expects.
    images = torch.from_numpy(tv.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    labels = torch.as_tensor(tv.targets, dtype=torch.int64)  # (N,)
    return images, labels, tuple(tv.classes)


# --- the JPEG copy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _JpegFile:
    """One image of the JPEG copy: where it is, its label, and (archive only) its bytes."""

    label: int
    file_name: str  # name inside its class folder; sorts the images within a class
    where: str  # path on disk or "archive.tar.gz:member", for error messages
    blob: bytes | None = None  # archive members are read while streaming the tar


def _load_cifar10_jpeg(root: Path, split: Split, cache_dir: Path, origin: str) -> tuple[Tensor, Tensor]:
    """Find the JPEG copy, then return the cached tensors or decode and cache them."""
    kind, source = _find_jpeg_source(root, split, origin)
    if kind == "folder":
        files = _scan_folder(source)
        key = _folder_cache_key(source, files, split)
    else:
        files = None  # the archive is only read on a cache miss
        key = _archive_cache_key(source, split)
    cache_file = cache_dir / f"{JPEG_FOLDER}-{split.value}-{key}.pt"
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    if files is None:
        files = _read_archive(source, split)
    # Deterministic order: by class (torchvision's order), then by file name within the class.
    files = sorted(files, key=lambda f: (f.label, f.file_name))
    blobs = [f.blob if f.blob is not None else _read_bytes(f.where) for f in files]
    images = _decode_jpegs(blobs, [f.where for f in files])  # (N, 3, 32, 32) uint8
    labels = torch.tensor([f.label for f in files], dtype=torch.int64)  # (N,)
    _write_cache(
        cache_file,
        {
            "format": _CACHE_FORMAT,
            "source": str(source),
            "split": split.value,
            "classes": list(CIFAR10_CLASSES),
            "images": images,
            "labels": labels,
        },
    )
    return images, labels


def _find_jpeg_source(root: Path, split: Split, origin: str) -> tuple[str, Path]:
    """The first of: extracted folder, root holding the splits directly, the archive."""
    extracted = root / JPEG_FOLDER / split.value
    direct = root / split.value
    archive = root / JPEG_ARCHIVE
    if extracted.is_dir():
        return "folder", extracted
    if direct.is_dir():
        return "folder", direct
    if archive.is_file():
        return "archive", archive
    raise FileNotFoundError(
        f"cifar10-jpeg ({split.value} split) not found under data root {root.absolute()} (from {origin}). "
        "Looked at:\n"
        f"  - {extracted.absolute()}/  (the extracted archive: {JPEG_FOLDER}/{split.value}/<class>/*.jpg)\n"
        f"  - {direct.absolute()}/  (a root holding train/ and test/ class folders directly)\n"
        f"  - {archive.absolute()}  (the archive, read without extracting)\n"
        f"To fix: point ${DATA_ENV} (or --data-root, or the root argument) at the folder holding "
        f"{JPEG_ARCHIVE} or its extracted {JPEG_FOLDER}/ folder."
    )


def _is_jpeg_name(name: str) -> bool:
    return name.lower().endswith(_JPEG_SUFFIXES)


def _check_class_folders(found: set[str], where: str) -> None:
    """Class folders must be exactly the ten CIFAR-10 classes (their names carry the labels)."""
    unknown = sorted(found - set(CIFAR10_CLASSES))
    if unknown:
        raise ValueError(
            f"unknown class folder(s) {unknown} in {where}; expected exactly the ten CIFAR-10 classes: "
            f"{', '.join(CIFAR10_CLASSES)}"
        )
    missing = [c for c in CIFAR10_CLASSES if c not in found]
    if missing:
        raise FileNotFoundError(
            f"missing class folder(s) {missing} in {where}; expected exactly the ten CIFAR-10 classes: "
            f"{', '.join(CIFAR10_CLASSES)}"
        )


def _check_counts(files: Sequence[_JpegFile], where: str) -> None:
    """A split with no images, or a class with none, is a broken copy, not a small one."""
    if not files:
        raise ValueError(f"no JPEG images in {where} (expected <class>/*.jpg under it)")
    present = {f.label for f in files}
    empty = [c for i, c in enumerate(CIFAR10_CLASSES) if i not in present]
    if empty:
        raise ValueError(f"class folder(s) {empty} in {where} hold no JPEG images")


def _scan_folder(split_dir: Path) -> list[_JpegFile]:
    """List ``split_dir/<class>/*.jpg`` (without reading the images); hidden files are skipped."""
    class_dirs: set[str] = set()
    for entry in os.scandir(split_dir):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends
        if not entry.is_dir():
            raise ValueError(f"unexpected file {entry.path}: {split_dir} should hold only class folders")
        class_dirs.add(entry.name)
    _check_class_folders(class_dirs, str(split_dir))
    files: list[_JpegFile] = []
    for label, cls in enumerate(CIFAR10_CLASSES):
        for entry in os.scandir(split_dir / cls):
            if entry.name.startswith("."):
                continue
            if not (entry.is_file() and _is_jpeg_name(entry.name)):
                raise ValueError(f"unexpected entry {entry.path}: class folders hold only .jpg/.jpeg files")
            files.append(_JpegFile(label=label, file_name=entry.name, where=entry.path))
    _check_counts(files, str(split_dir))
    return files


def _read_archive(archive: Path, split: Split) -> list[_JpegFile]:
    """Stream the tar once, keeping the bytes of ``[cifar10-jpeg/]<split>/<class>/*.jpg`` members."""
    files: list[_JpegFile] = []
    class_dirs: set[str] = set()
    # "r|*": sequential stream with any compression; a gzip tar cannot be read faster than front to back.
    try:
        return _read_stream(archive, split, files, class_dirs)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        from afs.io import CorruptFileError

        raise CorruptFileError(archive, f"a damaged or truncated archive: {err}",
                               "Copy the archive again from where it came from; the decoded cache is rebuilt from it") from None


def _read_stream(archive: Path, split: Split, files: list[_JpegFile], class_dirs: set[str]) -> list[_JpegFile]:
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "/")]
            if parts and parts[0] == JPEG_FOLDER:
                parts = parts[1:]  # the archive normally has the top folder; one without it works too
            if len(parts) < 2 or parts[0] != split.value or any(p.startswith(".") for p in parts):
                continue  # the other split, the top folders, hidden files
            where = f"{archive}:{member.name}"
            if member.isdir() and len(parts) == 2:
                class_dirs.add(parts[1])
                continue
            if len(parts) != 3 or not member.isfile() or not _is_jpeg_name(parts[2]):
                raise ValueError(f"unexpected archive member {where}: expected {split.value}/<class>/<name>.jpg")
            class_dirs.add(parts[1])
            label = _CIFAR10_INDEX.get(parts[1])
            if label is None:
                continue  # reported below with every unknown folder at once
            handle = tar.extractfile(member)
            assert handle is not None  # isfile() was checked above
            files.append(_JpegFile(label=label, file_name=parts[2], where=where, blob=handle.read()))
    _check_class_folders(class_dirs, f"{archive} ({split.value}/)")
    _check_counts(files, f"{archive} ({split.value}/)")
    return files


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _have_torchvision_decoder() -> bool:
    """Whether this torchvision still ships ``io.decode_jpeg`` (deprecated in 0.29, to be removed)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_jpegs(blobs: Sequence[bytes], names: Sequence[str], *, use_torchvision: bool | None = None) -> Tensor:
    """Decode JPEG bytes into one uint8 ``(N, 3, 32, 32)`` tensor; any bad image is named in the error.

    One call per image rather than torchvision's list form: on the CPU the two are equally fast (both
    loop in C++/Python over libjpeg), and per image the error can name the file.
    """
    if use_torchvision is None:
        use_torchvision = _have_torchvision_decoder()
    out = torch.empty((len(blobs), *IMAGE_SHAPE), dtype=torch.uint8)  # filled in place, no stack copy
    if use_torchvision:
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(blob: bytes) -> Tensor:
            raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)  # bytearray: writable, no warning
            return decode_jpeg(raw, mode=ImageReadMode.RGB)  # (3, H, W); grey JPEGs become RGB

    else:
        import numpy as np
        from PIL import Image

        def decode(blob: bytes) -> Tensor:
            with Image.open(io.BytesIO(blob)) as img:
                if img.format != "JPEG":
                    raise ValueError(f"not a JPEG file (PIL reads it as {img.format})")
                hwc = np.asarray(img.convert("RGB"))  # (H, W, 3)
            return torch.from_numpy(hwc.copy()).permute(2, 0, 1)

    with warnings.catch_warnings():
        # torchvision 0.29 warns on every codec call that the codecs move to TorchCodec; known, see module doc.
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, (blob, name) in enumerate(zip(blobs, names)):
            if not blob:
                raise ValueError(f"empty image file {name}")
            try:
                img = decode(blob)
            except Exception as err:  # libjpeg / PIL errors come in many types; all mean a bad file
                raise ValueError(f"cannot decode {name} as a JPEG image: {err}") from None
            if tuple(img.shape) != IMAGE_SHAPE:
                raise ValueError(
                    f"{name} decodes to {img.shape[1]}x{img.shape[2]} pixels (C={img.shape[0]}); "
                    "CIFAR images must be 3x32x32"
                )
            out[i] = img
    return out


# --- the decoded-JPEG cache -------------------------------------------------------------------------


def _archive_cache_key(archive: Path, split: Split) -> str:
    """Key = hash(format, absolute path, size, mtime, split): a replaced or touched archive decodes again."""
    st = archive.stat()
    text = f"v{_CACHE_FORMAT}|archive|{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}|{split.value}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _folder_cache_key(split_dir: Path, files: Sequence[_JpegFile], split: Split) -> str:
    """Key = hash over every image's name, size and mtime: a folder's own mtime misses edits inside it."""
    h = hashlib.sha256(f"v{_CACHE_FORMAT}|folder|{split_dir.resolve()}|{split.value}".encode())
    for f in sorted(files, key=lambda f: (f.label, f.file_name)):
        st = os.stat(f.where)  # ~60k stats: a fraction of a second, far below a decode
        h.update(f"|{f.label}/{f.file_name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _read_cache(path: Path) -> tuple[Tensor, Tensor] | None:
    """The cached (images, labels), or None if absent; an unreadable cache is rebuilt with a warning."""
    if not path.is_file():
        return None
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = payload["images"], payload["labels"]
        valid = (
            payload.get("format") == _CACHE_FORMAT
            and payload.get("classes") == list(CIFAR10_CLASSES)
            and isinstance(images, Tensor)
            and images.dtype == torch.uint8
            and images.dim() == 4
            and tuple(images.shape[1:]) == IMAGE_SHAPE
            and isinstance(labels, Tensor)
            and labels.dtype == torch.int64
            and tuple(labels.shape) == (images.shape[0],)
        )
    except Exception as err:  # truncated file, foreign pickle, missing keys: all mean "decode again"
        warnings.warn(f"ignoring unreadable cache {path} ({err}); decoding the JPEGs again", stacklevel=3)
        return None
    if not valid:
        warnings.warn(f"ignoring cache {path}: unexpected contents; decoding the JPEGs again", stacklevel=3)
        return None
    return images, labels


def _write_cache(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then os.replace: readers never see a half-written cache."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache in a shared $AFS_CACHE should be readable by all
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        # The data are decoded and correct; only the next load gets slower. Say so rather than fail.
        warnings.warn(
            f"could not write the decoded-JPEG cache {path} ({err}); the next load decodes again. "
            f"Set ${CACHE_ENV} or cache_dir to a writable folder.",
            stacklevel=4,
        )
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------
# Splits and subsets (indices only; they never see the test set)
# ----------------------------------------------------------------------------------------------------


def _derived_seed(tag: str, *values: int) -> int:
    """A 63-bit seed from a tag and integers. Hashing keeps (seed, epoch) pairs and tags from colliding."""
    text = tag + "|" + "|".join(str(int(v)) for v in values)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _as_index(indices: Tensor | Sequence[int], n: int, what: str) -> Tensor:
    """A 1-D int64 CPU index tensor with every entry in [0, n)."""
    idx = indices if isinstance(indices, Tensor) else torch.as_tensor(list(indices), dtype=torch.int64)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{what} must be integers, got {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.int64)
    if idx.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what} must lie in [0, {n - 1}], got [{int(idx.min())}, {int(idx.max())}]")
    return idx


def _as_labels(labels: Tensor | Sequence[int]) -> Tensor:
    """Labels as a 1-D int64 CPU tensor of non-negative class indices."""
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(list(labels))
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be integer class indices, got {y.dtype}")
    y = y.to(device="cpu", dtype=torch.int64)
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got min {int(y.min())}")
    return y


def _even_quotas(counts: Tensor, total: int, gen: torch.Generator) -> Tensor:
    """Split `total` over classes as evenly as possible, no class above its own count (water filling).

    Classes too small for an equal share give all they have and the rest is shared again; the last
    ``total mod (open classes)`` items go to randomly chosen (seeded) classes, not always the first ones.
    Requires ``total <= counts.sum()``.
    """
    quota = torch.zeros_like(counts)
    remaining = total
    while remaining > 0:
        open_classes = (quota < counts).nonzero().flatten()
        share = remaining // len(open_classes)
        if share == 0:
            lucky = open_classes[torch.randperm(len(open_classes), generator=gen)[:remaining]]
            quota[lucky] += 1
            break
        add = torch.clamp(counts[open_classes] - quota[open_classes], max=share)
        quota[open_classes] += add
        remaining -= int(add.sum())
    return quota


def _stratified_pick(y: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Sorted indices of `k` samples spread evenly over the classes of `y`, random within each class."""
    counts = torch.bincount(y) if y.numel() else torch.zeros(0, dtype=torch.int64)
    quota = _even_quotas(counts, k, gen)
    picked = []
    for cls in range(len(counts)):
        q = int(quota[cls])
        if q:
            members = (y == cls).nonzero().flatten()
            picked.append(members[torch.randperm(len(members), generator=gen)[:q]])
    if not picked:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat(picked).sort().values


def train_val_split(labels: Tensor | Sequence[int], val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split training indices into (train_idx, val_idx), stratified by class.

    Pass the labels of the *training* set only: validation comes out of it and the test set is never
    involved. `val_size` is spread evenly over the classes as far as their sizes allow. Both results are
    sorted int64 tensors, disjoint, together covering ``range(len(labels))``; the same (labels,
    val_size, seed) always gives the same split.
    """
    y = _as_labels(labels)
    n = len(y)
    if isinstance(val_size, bool) or not isinstance(val_size, int):
        raise TypeError(f"val_size must be an int, got {type(val_size).__name__}")
    if not 0 <= val_size < n:
        raise ValueError(
            f"val_size must be in [0, {n - 1}] for {n} training samples (train must stay non-empty), got {val_size}"
        )
    gen = torch.Generator().manual_seed(_derived_seed("train_val_split", seed))
    val_idx = _stratified_pick(y, val_size, gen)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def balanced_subset(labels: Tensor | Sequence[int], n: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a class-balanced subset of `n` samples; ``n=None`` or ``n >= len(labels)``: all."""
    y = _as_labels(labels)
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= len(y)):
        return torch.arange(len(y), dtype=torch.int64)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    # A different derived seed than train_val_split: the same seed must not pick correlated samples.
    gen = torch.Generator().manual_seed(_derived_seed("balanced_subset", seed))
    return _stratified_pick(y, n, gen)


# ----------------------------------------------------------------------------------------------------
# Augmentation and the on-device loader
# ----------------------------------------------------------------------------------------------------


def _describe(x: object) -> str:
    """dtype and shape of a tensor, else its type name (for error messages)."""
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def crop_flip(images: Tensor, offset_y: Tensor, offset_x: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Batched random-crop-with-zero-padding + horizontal flip, given each sample's crop and flip.

    ``out[b] = window of pad(images[b]) at (offset_y[b], offset_x[b])``, mirrored left-right where
    ``flip[b]``; offsets lie in ``[0, 2*padding]`` (``padding`` is the identity crop). One gather for the
    whole batch, no per-image Python loop. Works for any dtype; the loader calls it on uint8 (4x less
    memory traffic than float).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    for name, t in (("offset_y", offset_y), ("offset_x", offset_x), ("flip", flip)):
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},), got {tuple(t.shape)}")
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p), zeros outside
    dev = images.device
    rows = offset_y.to(dev, torch.int64)[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = offset_x.to(dev, torch.int64)[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip.to(dev, torch.bool)[:, None], cols.flip(1), cols)  # mirrored window columns
    bi = torch.arange(b, device=dev)[:, None, None, None]  # (B, 1, 1, 1)
    ci = torch.arange(c, device=dev)[None, :, None, None]  # (1, C, 1, 1)
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


class DeviceLoader:
    """Mini-batches from uint8 images kept on one device; yields ``(x float32 in [0,1], y int64)``.

    The uint8 tensor is moved to `device` once (CIFAR-10 train is 150 MiB), so an epoch costs no
    host-to-device image copies; each batch is a gather, optional crop + flip, and ``/255``.

    Reproducibility: every random choice of epoch ``e`` (the permutation, crop offsets, flips) comes from
    a ``torch.Generator`` seeded by hash(seed, e), so epoch e is the same whatever ran before.
    ``iter(loader)`` uses the current epoch and then advances it by one; ``set_epoch(e)`` makes the next
    iteration epoch ``e`` (call it at the top of every epoch, as with ``DistributedSampler``, to resume
    exactly after a kill). The generator lives on the CPU on purpose: CUDA generators give different
    streams, and a CPU one makes the order identical on every device; it draws only ~4N small integers
    per epoch, copied to the device in one go.

    Augmentation randomness is drawn per position of the epoch's global permutation, so a given sample
    gets the same crop/flip in epoch e whatever the batch size or number of ranks.

    Sharding (DDP): rank r of w takes the strided share ``perm[r::w]`` of the same global permutation,
    so the ranks together cover it exactly once. Without `drop_last` the shares differ by at most one
    sample (and so possibly by one batch); with `drop_last` each rank keeps ``N // w`` samples and full
    batches only, so all ranks run the same number of steps (what DDP needs).
    """

    def __init__(
        self,
        images_uint8: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
        rank: int = 0,
        world_size: int = 1,
        padding: int = 4,
    ) -> None:
        if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise TypeError(f"images_uint8 must be a uint8 tensor (N, C, H, W), got {_describe(images_uint8)}")
        n = images_uint8.shape[0]
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise TypeError(f"labels must be an int64 tensor of shape ({n},), got {_describe(labels)}")
        for name, value, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("padding", padding, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size - 1}] (world_size={world_size}), got {rank!r}")
        self.device = torch.device(device) if device is not None else images_uint8.device
        self.images = images_uint8.to(self.device)  # (N, C, H, W) uint8, moved once
        self.labels = labels.to(self.device)  # (N,)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.padding = padding
        self.epoch = 0  # the epoch the next iteration uses

    @classmethod
    def from_data(cls, data: ImageData, batch_size: int, **kwargs: Any) -> DeviceLoader:
        """A loader over an `ImageData` (same keyword arguments as the constructor)."""
        return cls(data.images, data.labels, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (its order and augmentation are fixed by seed + epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        n = int(self.images.shape[0])
        if self.drop_last:
            return (n // self.world_size) // self.batch_size * self.batch_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.images.shape[0]}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"augment={self.augment}, drop_last={self.drop_last}, seed={self.seed}, device={self.device}, "
            f"rank={self.rank}/{self.world_size}, epoch={self.epoch})"
        )

    def _epoch_plan(self, epoch: int) -> tuple[Tensor, Tensor | None]:
        """This rank's sample order and (if augmenting) per-sample (dy, dx, flip) rows, on the CPU."""
        n = int(self.images.shape[0])
        gen = torch.Generator().manual_seed(_derived_seed("DeviceLoader", self.seed, epoch))
        # Draw order fixed (permutation, then augmentation) so each is a pure function of (seed, epoch).
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        aug = None
        if self.augment:
            offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=gen)  # dy, dx in [0, 2p]
            flips = torch.randint(0, 2, (1, n), generator=gen)  # 1 = mirror left-right
            aug = torch.cat([offsets, flips])  # (3, N): rows dy, dx, flip
        share = slice(self.rank, None, self.world_size)
        order = order[share]
        aug = aug[:, share] if aug is not None else None
        keep = self.num_samples
        return order[:keep], (aug[:, :keep] if aug is not None else None)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # advanced now, not at the end: iter() alone fixes which epoch this is
        order, aug = self._epoch_plan(epoch)
        # One host-to-device copy per epoch for the plan; the batches below are device-side gathers.
        order = order.to(self.device, non_blocking=True)
        aug = aug.to(self.device, non_blocking=True) if aug is not None else None
        return self._batches(order, aug)

    def _batches(self, order: Tensor, aug: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]  # (B,)
            x = self.images[idx]  # (B, C, H, W) uint8
            if aug is not None:
                a = aug[:, start : start + self.batch_size]  # (3, B)
                x = crop_flip(x, a[0], a[1], a[2], self.padding)
            yield x.float().div_(255.0), self.labels[idx]
