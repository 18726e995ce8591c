"""Atomic file and directory writes, and a fingerprint of base-model weights.

A directory is written under a temporary sibling name, fsynced, then swapped in with
``os.replace``, so a crash leaves either the previous complete directory or the new one,
never a half-written mix. The fingerprint samples a fixed set of entries from every base
weight (rounded to bfloat16, so loading the base in another dtype still matches) and hashes
them with names and shapes: cheap even for 7B models, and any retrained or different base
changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

SAMPLES_PER_TENSOR = 2048


def sample_indices(numel: int, count: int, device=None) -> torch.Tensor:
    """``count`` evenly spread indices into ``numel`` entries, the first and the last included.

    Up to 2**24 entries this is float32 ``linspace`` (as fingerprints were always computed, so
    saved adapters keep matching); above it float32 cannot hold every integer and the last
    index rounded past the end (SmolLM2-135M's 28.3M-entry embedding crashed ``MemGen()``),
    so larger tensors use exact integer arithmetic.
    """
    if numel <= 1 << 24:
        return torch.linspace(0, numel - 1, count, device=device).long()
    if count == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.arange(count, dtype=torch.long, device=device) * (numel - 1) // (count - 1)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over names, shapes and a strided sample of every parameter's values."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = param.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = sample_indices(flat.numel(), count, flat.device)
        sample = flat[index].float().to(torch.bfloat16).float().cpu().numpy().tobytes()
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample)
    return digest.hexdigest()


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a scratch directory; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    try:
        yield scratch
        _fsync_tree(scratch)
        if final.exists():
            retired = final.parent / f".{final.name}.old-{os.getpid()}"
            if retired.exists():
                shutil.rmtree(retired)
            os.replace(final, retired)
            os.replace(scratch, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(handle)`` on a temporary sibling of ``path``, fsync it, then ``os.replace`` it into place."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(scratch, "wb" if binary else "w") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    _atomic_write(path, lambda handle: handle.write(data), binary=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda handle: handle.write(text))


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` atomically."""
    _atomic_write(path, lambda handle: json.dump(data, handle, indent=2, sort_keys=True))
