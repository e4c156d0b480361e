"""Tests for afs.data: loaders on data written in the real on-disk formats, splits, and DeviceLoader.

The CIFAR pickles and the JPEG folders/archives below are written exactly as the real ones are laid
out, so what runs is torchvision's real CIFAR loader and our real JPEG reader, not a fake.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import afs.data as data_mod
from afs.data import (
    CIFAR10_CLASSES,
    DATASETS,
    DatasetName,
    DeviceLoader,
    ImageData,
    Split,
    balanced_subset,
    crop_flip,
    load_dataset,
    resolve_cache_dir,
    resolve_data_root,
    train_val_split,
)

# ----------------------------------------------------------------------------------------------------
# Writers of the real on-disk formats (test-only helpers)
# ----------------------------------------------------------------------------------------------------


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py`` as in the official tarball: rows of 3072 bytes (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": rows,  # (n, 3072) uint8
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        _write_pickle(folder / name, entry)
        written[name] = (rows, labels)
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    _write_pickle(folder / "batches.meta", meta)
    return written


CIFAR100_FINE = tuple(f"fine_{i:02d}" for i in range(100))


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 1) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` with fine and coarse labels, as in the official tarball."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [f // 5 for f in fine]
        entry = {
            "filenames": [f"{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": coarse,
            "data": rows,
        }
        _write_pickle(folder / name, entry)
        written[name] = (rows, fine)
    meta = {"fine_label_names": list(CIFAR100_FINE), "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    _write_pickle(folder / "meta", meta)
    return written


@pytest.fixture
def accept_synthetic_md5(monkeypatch):
    """torchvision checks each CIFAR file's MD5 against the official files; ours are synthetic, so the
    check is reduced to "the file exists" (check_integrity with md5=None). Everything else — reading the
    pickles, the label keys, the NHWC reshape, batches.meta — is torchvision's real loading path, and a
    missing file still fails."""
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets.utils import check_integrity

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: check_integrity(fpath, None))


def smooth_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A smooth random RGB image (H, W, 3): JPEG keeps such images close to the original."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def jpeg_bytes(hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="JPEG", quality=95, subsampling=0)  # 4:4:4, near lossless
    return buf.getvalue()


# Names deliberately written out of order: the loader must sort them.
JPEG_NAMES = ("0002.jpg", "0000.jpg", "0001.jpg")


def write_jpeg_tree(split_root: Path, seed: int = 0, classes=CIFAR10_CLASSES, per_class=None) -> dict:
    """``split_root/{train,test}/<class>/NNNN.jpg``; returns {split: {(class, name): HWC original}}."""
    rng = np.random.default_rng(seed)
    originals: dict = {}
    for split in ("train", "test"):
        originals[split] = {}
        for cls in classes:
            folder = split_root / split / cls
            folder.mkdir(parents=True)
            for name in (per_class or JPEG_NAMES):
                img = smooth_image(rng)
                (folder / name).write_bytes(jpeg_bytes(img))
                originals[split][(cls, name)] = img
    return originals


def expected_order(originals_split: dict) -> tuple[np.ndarray, list[int]]:
    """The order the loader promises: class (torchvision order), then file name."""
    keys = sorted(originals_split, key=lambda k: (CIFAR10_CLASSES.index(k[0]), k[1]))
    images = np.stack([originals_split[k].transpose(2, 0, 1) for k in keys])  # (N, 3, 32, 32)
    return images, [CIFAR10_CLASSES.index(k[0]) for k in keys]


def make_archive(src_parent: Path, archive: Path) -> None:
    """A .tar.gz holding ``cifar10-jpeg/...`` like the real archive."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_parent / "cifar10-jpeg", arcname="cifar10-jpeg")


@pytest.fixture
def jpeg_root(tmp_path):
    """A data root with the extracted layout ``root/cifar10-jpeg/{train,test}/<class>/*.jpg``."""
    root = tmp_path / "data"
    originals = write_jpeg_tree(root / "cifar10-jpeg")
    return root, originals


# ----------------------------------------------------------------------------------------------------
# Names, roots, ImageData
# ----------------------------------------------------------------------------------------------------


def test_names_and_enums():
    assert DATASETS == ("cifar10", "cifar100", "cifar10-jpeg")
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert DatasetName("cifar10-jpeg") is DatasetName.CIFAR10_JPEG is DatasetName(DatasetName.CIFAR10_JPEG)
    assert Split("TEST") is Split.TEST


def test_resolve_roots(monkeypatch, tmp_path):
    monkeypatch.delenv("AFS_DATA", raising=False)
    monkeypatch.delenv("AFS_CACHE", raising=False)
    assert resolve_data_root() == Path("data")
    assert resolve_cache_dir() == Path.home() / ".cache" / "afs"
    monkeypatch.setenv("AFS_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("AFS_CACHE", str(tmp_path / "c"))
    assert resolve_data_root() == tmp_path / "d"
    assert resolve_cache_dir() == tmp_path / "c"
    # An explicit argument wins over the environment.
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"
    assert resolve_cache_dir(tmp_path / "y") == tmp_path / "y"


def _image_data(n=6, classes=("a", "b", "c")):
    return ImageData(
        images=torch.arange(n * 3 * 32 * 32).reshape(n, 3, 32, 32).remainder(256).to(torch.uint8),
        labels=torch.arange(n) % len(classes),
        classes=classes,
        name="toy",
        split="train",
    )


def test_image_data_validation_and_subset():
    d = _image_data()
    assert len(d) == 6
    assert torch.bincount(d.labels).tolist() == [2, 2, 2]
    sub = d.subset([4, 1], split="val")
    assert len(sub) == 2 and sub.split == "val" and sub.name == "toy"
    assert torch.equal(sub.images[0], d.images[4]) and sub.labels.tolist() == [1, 1]
    assert len(d.subset(torch.zeros(0, dtype=torch.int64))) == 0
    with pytest.raises(ValueError, match="subset indices"):
        d.subset([6])
    with pytest.raises(TypeError, match="integers"):
        d.subset(torch.ones(6, dtype=torch.bool))
    ok = dict(images=d.images, labels=d.labels, classes=d.classes, name="toy", split="train")
    with pytest.raises(TypeError, match="uint8"):
        ImageData(**{**ok, "images": d.images.float()})
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        ImageData(**{**ok, "images": d.images[:, :, :16]})
    with pytest.raises(TypeError, match="int64"):
        ImageData(**{**ok, "labels": d.labels.int()})
    with pytest.raises(ValueError, match="shape"):
        ImageData(**{**ok, "labels": d.labels[:5]})
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        ImageData(**{**ok, "labels": d.labels + 1})
    with pytest.raises(ValueError, match="non-empty sequence of str"):
        ImageData(**{**ok, "classes": "abc"})
    with pytest.raises(ValueError, match="duplicates"):
        ImageData(**{**ok, "classes": ("a", "a", "b")})


def test_unknown_name_and_bad_split(tmp_path):
    with pytest.raises(ValueError, match="'cifar10', 'cifar100', 'cifar10-jpeg'"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match=r"unknown split .*'val'; valid: 'train', 'test'"):
        load_dataset("cifar10", tmp_path, "val")
    with pytest.raises(ValueError, match="cannot be downloaded"):
        load_dataset("cifar10-jpeg", tmp_path, download=True)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10/100 through torchvision
# ----------------------------------------------------------------------------------------------------


def test_cifar10_pickles(tmp_path, accept_synthetic_md5):
    written = write_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar10", tmp_path, "test")
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert (train.name, train.split, len(train), len(test)) == ("cifar10", "train", 30, 6)
    assert train.classes == CIFAR10_CLASSES
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 3, 32, 32) and train.images.is_contiguous()
    # A row of the pickle is the R, G and B planes of 32x32 each: NCHW must match that exactly.
    assert torch.equal(train.images, torch.from_numpy(rows.reshape(30, 3, 32, 32)))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"][0].reshape(6, 3, 32, 32)))


def test_cifar100_pickles(tmp_path, accept_synthetic_md5):
    written = write_cifar100(tmp_path)
    train = load_dataset("cifar100", tmp_path, "train")
    test = load_dataset("cifar100", tmp_path, Split.TEST)
    assert train.classes == CIFAR100_FINE and len(train) == 12 and len(test) == 5
    assert train.labels.tolist() == written["train"][1]  # fine labels, not coarse
    assert torch.equal(test.images, torch.from_numpy(written["test"][0].reshape(5, 3, 32, 32)))


def test_cifar_missing_names_folder_and_fixes(tmp_path, accept_synthetic_md5):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "download=True" in msg and "AFS_DATA" in msg and "cifar10-jpeg" in msg
    # One batch missing is as fatal as all of them (torchvision checks every file before loading).
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)


def test_cifar_real_md5_check_rejects_synthetic(tmp_path):
    # Without the patch, torchvision's MD5 check runs and our synthetic files fail it: reported as corrupt.
    write_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="MD5"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------------------------------
# The JPEG copy: layouts, order, pixels, cache
# ----------------------------------------------------------------------------------------------------


def _check_against(data: ImageData, originals_split: dict, split: str) -> None:
    expected, labels = expected_order(originals_split)
    assert (data.name, data.split, data.classes) == ("cifar10-jpeg", split, CIFAR10_CLASSES)
    assert data.images.dtype == torch.uint8 and data.images.shape == (30, 3, 32, 32)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels
    err = (data.images.to(torch.int16) - torch.from_numpy(expected).to(torch.int16)).abs().float()
    # Quality 95, 4:4:4 on smooth images: a few levels on average. A wrong order or channel layout
    # would be off by tens of levels.
    assert err.mean() < 3.0, err.mean()


@pytest.mark.parametrize("layout", ["extracted", "direct", "archive"])
def test_jpeg_layouts(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "direct":
        originals = write_jpeg_tree(root)  # root/{train,test}/<class>/
    else:
        originals = write_jpeg_tree(root / "cifar10-jpeg")
        if layout == "archive":
            make_archive(root, tmp_path / "cifar10-jpeg.tar.gz")
            root = tmp_path  # holds only the archive
    for split in ("train", "test"):
        _check_against(load_dataset("cifar10-jpeg", root, split, cache_dir=tmp_path / "cache"), originals[split], split)


def test_jpeg_root_from_env(monkeypatch, jpeg_root, tmp_path):
    root, originals = jpeg_root
    monkeypatch.setenv("AFS_DATA", str(root))
    monkeypatch.setenv("AFS_CACHE", str(tmp_path / "envcache"))
    _check_against(load_dataset("cifar10-jpeg", split="test"), originals["test"], "test")
    assert len(list((tmp_path / "envcache").glob("cifar10-jpeg-test-*.pt"))) == 1


def test_decoders_agree(jpeg_root):
    root, _ = jpeg_root
    paths = sorted((root / "cifar10-jpeg" / "train").rglob("*.jpg"))
    blobs = [p.read_bytes() for p in paths]
    names = [str(p) for p in paths]
    tv = data_mod._decode_jpegs(blobs, names, use_torchvision=True)
    pil = data_mod._decode_jpegs(blobs, names, use_torchvision=False)
    # Both sit on libjpeg(-turbo) with the same default IDCT/upsampling; allow 1 level for other builds.
    assert (tv.to(torch.int16) - pil.to(torch.int16)).abs().max() <= 1


class _DecodeCounter:
    def __init__(self):
        self.calls = 0
        self.real = data_mod._decode_jpegs

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("layout", ["extracted", "archive"])
def test_jpeg_cache(tmp_path, monkeypatch, layout):
    originals = write_jpeg_tree(tmp_path / "src" / "cifar10-jpeg")
    if layout == "archive":
        root = tmp_path / "arch"
        root.mkdir()
        make_archive(tmp_path / "src", root / "cifar10-jpeg.tar.gz")
    else:
        root = tmp_path / "src"
    cache = tmp_path / "cache"
    counter = _DecodeCounter()
    monkeypatch.setattr(data_mod, "_decode_jpegs", counter)

    first = load_dataset("cifar10-jpeg", root, "train", cache_dir=cache)
    files = list(cache.iterdir())
    assert counter.calls == 1 and len(files) == 1 and files[0].name.startswith("cifar10-jpeg-train-")
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file behind
    assert files[0].stat().st_mode & 0o777 == 0o644
    mtime = files[0].stat().st_mtime_ns

    second = load_dataset("cifar10-jpeg", root, "train", cache_dir=cache)
    assert counter.calls == 1, "second load decoded again instead of reading the cache"
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    # The key follows the source: a changed image (or archive) is a new source and decodes again.
    changed = tmp_path / "src" / "cifar10-jpeg" / "train" / "cat" / "0001.jpg"
    changed.write_bytes(jpeg_bytes(np.zeros((32, 32, 3), np.uint8)))
    if layout == "archive":
        make_archive(tmp_path / "src", root / "cifar10-jpeg.tar.gz")
    third = load_dataset("cifar10-jpeg", root, "train", cache_dir=cache)
    assert counter.calls == 2 and len(list(cache.iterdir())) == 2
    cat1 = 3 * 3 + 1  # cat is class 3, 0001.jpg is its second file
    assert third.images[cat1].float().mean() < 2 and first.images[cat1].float().mean() > 20

    # A damaged cache is rebuilt, with a warning, never trusted.
    for f in cache.iterdir():
        f.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        fourth = load_dataset("cifar10-jpeg", root, "train", cache_dir=cache)
    assert counter.calls == 3 and torch.equal(fourth.images, third.images)
    _check_against(first, originals["train"], "train")


def test_jpeg_missing_lists_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("AFS_DATA", raising=False)
    root = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    msg = str(info.value)
    for looked in (root / "cifar10-jpeg" / "train", root / "train", root / "cifar10-jpeg.tar.gz"):
        assert str(looked.absolute()) in msg
    assert "AFS_DATA" in msg and "the root argument" in msg


def test_jpeg_unknown_class_folder(jpeg_root, tmp_path):
    root, _ = jpeg_root
    extra = root / "cifar10-jpeg" / "train" / "unicorn"
    extra.mkdir()
    (extra / "0000.jpg").write_bytes(jpeg_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match="unknown class folder.*unicorn"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    # Same check when reading straight from the archive.
    make_archive(root, tmp_path / "cifar10-jpeg.tar.gz")
    with pytest.raises(ValueError, match="unknown class folder.*unicorn"):
        load_dataset("cifar10-jpeg", tmp_path, "train", cache_dir=tmp_path / "c")
    # The other split is untouched and still loads.
    assert len(load_dataset("cifar10-jpeg", root, "test", cache_dir=tmp_path / "c")) == 30


def test_jpeg_missing_class_folder(jpeg_root, tmp_path):
    root, _ = jpeg_root
    truck = root / "cifar10-jpeg" / "train" / "truck"
    for f in truck.iterdir():
        f.unlink()
    truck.rmdir()
    with pytest.raises(FileNotFoundError, match=r"missing class folder.*\['truck'\]"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    make_archive(root, tmp_path / "cifar10-jpeg.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"missing class folder.*\['truck'\]"):
        load_dataset("cifar10-jpeg", tmp_path, "train", cache_dir=tmp_path / "c")


def test_jpeg_wrong_size_and_corrupt_file_named(jpeg_root, tmp_path):
    root, _ = jpeg_root
    bad = root / "cifar10-jpeg" / "train" / "cat" / "0001.jpg"
    bad.write_bytes(jpeg_bytes(np.zeros((16, 24, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"cat/0001\.jpg decodes to 16x24"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    make_archive(root, tmp_path / "cifar10-jpeg.tar.gz")
    member = r"cifar10-jpeg\.tar\.gz:cifar10-jpeg/train/cat/0001\.jpg"
    with pytest.raises(ValueError, match=member + " decodes to 16x24"):
        load_dataset("cifar10-jpeg", tmp_path, "train", cache_dir=tmp_path / "c")
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode .*cat/0001\.jpg"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing cached on failure


def test_jpeg_empty_split_and_stray_files(tmp_path):
    root = tmp_path / "data"
    for cls in CIFAR10_CLASSES:
        (root / "cifar10-jpeg" / "train" / cls).mkdir(parents=True)
    with pytest.raises(ValueError, match="no JPEG images"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    (root / "cifar10-jpeg" / "train" / "cat" / "0000.jpg").write_bytes(jpeg_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"hold no JPEG images"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")
    (root / "cifar10-jpeg" / "train" / "labels.txt").write_text("x")
    with pytest.raises(ValueError, match="labels.txt"):
        load_dataset("cifar10-jpeg", root, "train", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------------------------------
# The real offline copy (CI has it; skipped only where it is absent)
# ----------------------------------------------------------------------------------------------------


def _real_jpeg_root() -> Path | None:
    for candidate in (os.environ.get("AFS_DATA"), "/work/shared/data"):
        if not candidate:
            continue
        if (Path(candidate) / "cifar10-jpeg.tar.gz").is_file() or (Path(candidate) / "cifar10-jpeg").is_dir():
            return Path(candidate)
    return None


REAL_ROOT = _real_jpeg_root()


@pytest.fixture(scope="session")
def real_jpeg(tmp_path_factory):
    """Both splits of the real copy, decoded once per session into a session-wide temporary cache.

    Measured on 2 CPU cores: ~6 s for train (2.2 s reading the gzip tar, 3.1 s decoding 50k) and ~3 s
    for test, plus ~2.5 s for a first torchvision import; cached reloads take ~0.4 s.
    """
    cache = tmp_path_factory.mktemp("afs_cache")
    t0 = time.perf_counter()
    train = load_dataset("cifar10-jpeg", REAL_ROOT, "train", cache_dir=cache)
    test = load_dataset("cifar10-jpeg", REAL_ROOT, "test", cache_dir=cache)
    return train, test, time.perf_counter() - t0, cache


@pytest.mark.skipif(REAL_ROOT is None, reason="the offline CIFAR-10 JPEG copy is not on this machine")
def test_real_offline_copy(real_jpeg):
    train, test, seconds, cache = real_jpeg
    print(f"real cifar10-jpeg: decoded 60,000 images in {seconds:.1f} s")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.classes == CIFAR10_CLASSES == test.classes
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # Labels sorted by class (the promised order), and the channel order is RGB: CIFAR-10's well-known
    # per-channel training means (0.4914, 0.4822, 0.4465) survive JPEG to within a few thousandths.
    assert torch.equal(train.labels, torch.arange(10).repeat_interleave(5000))
    means = train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=5e-3), means
    # A reload reads the cache (sub-second) and is identical.
    again = load_dataset("cifar10-jpeg", REAL_ROOT, "test", cache_dir=cache)
    assert torch.equal(again.images, test.images)


# ----------------------------------------------------------------------------------------------------
# Splits and subsets
# ----------------------------------------------------------------------------------------------------


def test_train_val_split_properties():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(3))]
    train_idx, val_idx = train_val_split(labels, 100, seed=7)
    assert len(val_idx) == 100 and len(train_idx) == 400
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(500))  # disjoint + complete
    assert torch.bincount(labels[val_idx], minlength=10).tolist() == [10] * 10  # stratified
    again = train_val_split(labels, 100, seed=7)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], val_idx)
    assert not torch.equal(train_val_split(labels, 100, seed=8)[1], val_idx)
    # Uneven: 23 over 10 classes is 2 or 3 each, never more apart.
    counts = torch.bincount(labels[train_val_split(labels, 23)[1]], minlength=10)
    assert counts.sum() == 23 and counts.max() - counts.min() == 1
    # Val size 0 is allowed; the whole set or more is not (training would be empty).
    tr, va = train_val_split(labels, 0)
    assert len(va) == 0 and torch.equal(tr, torch.arange(500))
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(labels, 500)
    with pytest.raises(TypeError, match="val_size"):
        train_val_split(labels, 10.0)


def test_split_small_classes_fill_from_others():
    # Class 0 has only 2 samples: it gives both, the rest of the quota is spread over the other classes.
    labels = torch.tensor([0, 0] + [1] * 20 + [2] * 20)
    _, val_idx = train_val_split(labels, 12)
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [2, 5, 5]


def test_balanced_subset():
    labels = torch.arange(10).repeat_interleave(30)
    idx = balanced_subset(labels, 50, seed=1)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert torch.equal(idx, balanced_subset(labels, 50, seed=1))
    assert not torch.equal(idx, balanced_subset(labels, 50, seed=2))
    assert torch.equal(balanced_subset(labels, None), torch.arange(300))
    assert torch.equal(balanced_subset(labels, 10_000), torch.arange(300))
    assert len(balanced_subset(labels, 0)) == 0
    with pytest.raises(ValueError, match="non-negative"):
        balanced_subset(labels, -1)


# ----------------------------------------------------------------------------------------------------
# DeviceLoader
# ----------------------------------------------------------------------------------------------------


def _toy(n=10, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, hw, hw), generator=g, dtype=torch.uint8)
    labels = torch.arange(n)  # label = index: batches reveal which samples they hold
    return images, labels


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_batches_shapes_and_values():
    images, labels = _toy(10)
    loader = DeviceLoader(images, labels, 4, shuffle=False, device="cpu")
    batches = _epoch(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (10, 3, 8, 8)
    assert torch.equal(y, labels) and torch.equal(x, images.float() / 255)  # no shuffle, no augmentation
    assert 0.0 <= x.min() and x.max() <= 1.0
    dropped = DeviceLoader(images, labels, 4, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in dropped] == [4, 4]


def test_loader_seeding_and_set_epoch():
    images, labels = _toy(64)
    a = DeviceLoader(images, labels, 16, augment=True, seed=5)
    b = DeviceLoader(images, labels, 16, augment=True, seed=5)
    e3 = _epoch(a, 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e3, _epoch(b, 3)))
    e4 = _epoch(a)  # iteration advanced the epoch to 4
    assert not torch.equal(torch.cat([y for _, y in e3]), torch.cat([y for _, y in e4]))
    # Epoch 3 again after other epochs ran: identical (what an exact resume needs).
    _epoch(a, 7)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e3, _epoch(a, 3)))
    # Each epoch is a permutation of all samples; other seeds give other orders.
    assert torch.equal(torch.cat([y for _, y in e4]).sort().values, labels)
    c = DeviceLoader(images, labels, 16, augment=True, seed=6)
    assert not torch.equal(torch.cat([y for _, y in _epoch(c, 3)]), torch.cat([y for _, y in e3]))
    with pytest.raises(ValueError, match="epoch"):
        a.set_epoch(-1)


def _windows(original: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    """Every crop of the zero-padded image and its mirror: what crop+flip may legally produce."""
    c, h, w = original.shape
    padded = torch.nn.functional.pad(original, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[:, dy : dy + h, dx : dx + w]
            out += [win, win.flip(-1)]
    return out


def test_augmentation_is_crop_and_flip():
    images, labels = _toy(8, hw=8)
    loader = DeviceLoader(images, labels, 3, shuffle=False, augment=True, seed=1)
    saw_flip = saw_shift = False
    for epoch in range(4):
        for x, y in _epoch(loader, epoch):
            for img, i in zip(x, y.tolist()):
                u8 = (img * 255).round().to(torch.uint8)
                candidates = _windows(images[i])
                hits = [k for k, cand in enumerate(candidates) if torch.equal(u8, cand)]
                assert hits, f"augmented sample {i} is no crop/flip of its padded original"
                identity = 2 * (4 * 9 + 4)  # dy = dx = 4, unflipped
                saw_flip |= any(k % 2 == 1 for k in hits)
                saw_shift |= identity not in hits
    assert saw_flip and saw_shift  # the augmentation is not the identity


def test_crop_flip_known_case():
    img = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    # Offset (1, 3) with padding 2: rows -1..2 and cols 1..4 of the original (zeros outside), mirrored.
    out = crop_flip(img, torch.tensor([1]), torch.tensor([3]), torch.tensor([True]), padding=2)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    assert torch.equal(out, padded[:, :, 1:5, 3:7].flip(-1))


def test_rank_sharding_covers_permutation_once():
    images, labels = _toy(11)
    whole = torch.cat([y for _, y in _epoch(DeviceLoader(images, labels, 2, seed=3), 2)])
    shards = [
        torch.cat([y for _, y in _epoch(DeviceLoader(images, labels, 2, seed=3, rank=r, world_size=3), 2)])
        for r in range(3)
    ]
    # Strided shares of the same global permutation: together, every sample exactly once.
    assert torch.equal(torch.cat(shards).sort().values, labels)
    for r, shard in enumerate(shards):
        assert torch.equal(shard, whole[r::3])
    # drop_last: same number of full batches on every rank (DDP needs equal step counts).
    lens = [len(DeviceLoader(images, labels, 2, drop_last=True, rank=r, world_size=3)) for r in range(3)]
    assert lens == [1, 1, 1]
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(images, labels, 2, rank=3, world_size=3)


def test_augmentation_independent_of_batch_size_and_ranks():
    images, labels = _toy(12)
    ref = DeviceLoader(images, labels, 12, augment=True, seed=9)
    x_ref, y_ref = _epoch(ref, 1)[0]
    small = _epoch(DeviceLoader(images, labels, 5, augment=True, seed=9), 1)
    assert torch.equal(torch.cat([x for x, _ in small]), x_ref)
    rank1 = _epoch(DeviceLoader(images, labels, 5, augment=True, seed=9, rank=1, world_size=2), 1)
    assert torch.equal(torch.cat([x for x, _ in rank1]), x_ref[1::2])


def test_loader_input_validation():
    images, labels = _toy(4)
    with pytest.raises(TypeError, match="uint8"):
        DeviceLoader(images.float(), labels, 2)
    with pytest.raises(TypeError, match="int64"):
        DeviceLoader(images, labels.int(), 2)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(images, labels, 0)


def test_loader_from_image_data():
    d = _image_data(6)
    loader = DeviceLoader(d.images, d.labels, 4, shuffle=False, device=torch.device("cpu"))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, d.labels[:4])
