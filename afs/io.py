"""Small, boring, crash-safe file helpers and run provenance.

Every file a run writes goes through a temporary file in the same folder and ``os.replace``, so a run
killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import platform
import subprocess
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """A run file that cannot be read (truncated, not JSON, not a torch file): names the file and the remedy."""

    def __init__(self, path: Path, why: str, remedy: str | None = None) -> None:
        self.path = Path(path)
        remedy = remedy or (f"Delete the stage folder {self.path.parent} to redo that stage (finished stages "
                            f"elsewhere are kept)")
        super().__init__(f"{self.path} cannot be read ({why}); it was probably cut short by a crash or a full disk. "
                         f"{remedy}")


def _atomic_write(path: Path, write: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: Path) -> Any:
    """A JSON file's content; `CorruptFileError` naming the file when it is not JSON (e.g. truncated)."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"not valid JSON: {e.msg} at line {e.lineno}") from None


def load_torch(path: Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)``; `CorruptFileError` naming the file when it cannot be read."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if not Path(path).is_file():
            raise
        raise CorruptFileError(path, f"not a complete torch file: {str(e).splitlines()[0][:120]}") from None


def tensor_hash(*tensors: Any) -> str:
    """A short content hash (sha256, 16 hex digits) of tensors: dtype, shape and bytes, in order."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_hash(module: Any) -> str:
    """Content hash of a module's weights and buffers (its ``state_dict``, by name): what identifies a
    trained network to the stages that consume it, whatever file it was loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()[:16]


# The version of how stages derive their seeds (`derive_seed` and its tags), part of every stage's identity:
# a change to it changes every random stream, so no run made under another version is reused.
SEEDING = 1


def derive_seed(tag: str, *values: int | str) -> int:
    """The one seed derivation: a 63-bit seed from a tag and values (blake2b of ``tag|v1|v2...``). Hashing keeps
    neighbouring seeds unrelated and (seed, epoch) pairs and tags from colliding; a stream depends only on its
    own values, never on what ran before it (resume and rank-sharding repeat it exactly)."""
    text = tag + "|" + "|".join(str(v) for v in values)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # tensors, numpy values
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def git_sha() -> str | None:
    """The commit the code runs from (``-dirty`` appended when tracked files differ from it): ``$AFS_GIT_SHA``
    when set (a copy of the tree without its .git, e.g. on a device machine), else ``git rev-parse``."""
    env = os.environ.get("AFS_GIT_SHA")
    if env:
        return env
    here = str(Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        if not sha:
            return None
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(device: Any = None) -> dict[str, Any]:
    """Where and with what a result was made: code version, library versions, hardware, time."""
    import torch

    info: dict[str, Any] = {
        "git_sha": git_sha(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    for lib in ("torchvision", "triton"):  # optional for provenance
        try:
            info[lib] = importlib.import_module(lib).__version__
        except Exception:
            pass
    # The numerics actually in force (afs.runs.configure_numerics sets them explicitly).
    info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    info["deterministic"] = torch.are_deterministic_algorithms_enabled()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
