"""Atomic checkpoint files and the RNG states that make a resumed run continue exactly where it stopped."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "read_checkpoint", "rng_state", "set_rng_state"]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: readers see the
    old file or the new one, never half of one (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run folder's files are for others to read too
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, Any]:
    """The object saved at ``path`` (or ``path/checkpoint.pt`` for a run folder), loaded with weights_only."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a checkpoint.pt or its run folder")
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and RNG states only
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {str(path)!r} is corrupt, truncated or not a hypernorm checkpoint "
                         f"({first_line})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A run's checkpoint (a dict with model and config), or a one-line error naming the file."""
    path, state = read_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a hypernorm checkpoint (no model/config entries)")
    return state


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple:
    # As plain types and a tensor, so that torch.load(weights_only=True) accepts it.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
