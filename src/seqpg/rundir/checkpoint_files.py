"""The files of a checkpoint directory, for every kind of checkpoint (whole or sharded).

Names and formats (``meta.json``, the ``latest`` pointer, ``step-000040`` directories), the
atomic-write steps (temporary directory, fsync, rename, pointer), pruning and leftovers, the
per-file size and sha256 record, the RNG streams, and :class:`CheckpointDamaged`.  Both
:mod:`seqpg.rundir.checkpoint` (whole models) and :mod:`seqpg.rundir.checkpoint_dcp` (sharded)
write and read checkpoints through these.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn



FORMAT_VERSION = 2


READABLE_FORMATS = (1, 2)


CHECKPOINTS_DIR = "checkpoints"


LATEST_FILE = "latest"


META_FILE = "meta.json"


STEP_DIR = re.compile(r"^step-(\d+)$")


REPLACED_DIR = re.compile(r"^step-(\d+)\.replaced$")


def step_dir_name(step: int) -> str:
    """``step-000040``: the directory name of the checkpoint taken after step ``step``."""
    return f"step-{step:06d}"


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is swapped out.

    The old copy is renamed to ``step-N.replaced`` first, so that during the two renames a
    complete checkpoint of step N exists under a name :func:`latest_checkpoint` falls back to.
    """
    if final.exists():
        old = final.with_name(final.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        fsync_dir(final.parent)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        _discard(old)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    write_text(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


def prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep_last - 1`` newest older ones."""
    found = complete_checkpoints(root)  # sorted by step
    older = [p for s, p in found if s < step]
    newer = [p for s, p in found if s > step]
    doomed = older[:max(0, len(older) - (keep_last - 1))] + newer
    for path in doomed:
        _discard(path)


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: rename it to a hidden name first, so it never looks torn."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: Path) -> None:
    """Remove what an interrupted save left: temp dirs, trash, swapped-out copies of a step."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-", f".{LATEST_FILE}.tmp-")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif REPLACED_DIR.match(p.name):
            twin = p.with_name(p.name[: -len(".replaced")])
            if is_complete(twin):
                shutil.rmtree(p, ignore_errors=True)
            elif is_complete(p):  # the crash came between the two renames: put the old copy back
                if twin.exists():
                    shutil.rmtree(twin)
                os.replace(p, twin)
                fsync_dir(root)


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match what its ``meta.json`` records, or cannot be read."""


def file_checksums(root: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of the files ``names`` (relative to ``root``), by
    default of every file under ``root`` but ``meta.json``: the record ``verify_checkpoint`` checks, for
    whole and sharded checkpoints alike."""
    if names is None:
        names = [(Path(d) / f).relative_to(root).as_posix() for d, _, files in os.walk(root) for f in files]
        names = [n for n in names if n != META_FILE]
    return {n: {"bytes": (root / n).stat().st_size, "sha256": _sha256(root / n)} for n in sorted(names)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_problem(path: Path, want: Mapping[str, Any]) -> str:
    """Why ``path`` is not the file recorded as ``want`` ("" if it is)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != want.get("bytes"):
        return f"{size} bytes, but {want.get('bytes')} were written (truncated or damaged)"
    if _sha256(path) != want.get("sha256"):
        return "sha256 differs from the one recorded when it was written (damaged)"
    return ""


def is_complete(path: Path) -> bool:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") in READABLE_FORMATS


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint; a step's swapped-out copy only when its own is absent."""
    own, replaced = {}, {}
    for p in root.iterdir():
        for pattern, into in ((STEP_DIR, own), (REPLACED_DIR, replaced)):
            m = pattern.match(p.name)
            if m and is_complete(p):
                into[int(m.group(1))] = p
    return sorted({**replaced, **own}.items())


def peft_adapter_names(model: nn.Module) -> list[str] | None:
    """The adapter names of a ``peft.PeftModel``, or None for any other module."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return sorted(model.peft_config) if isinstance(model, PeftModel) else None


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA / MPS) RNG states, as ``rng.pt`` stores them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Reset the global RNGs to states from :func:`capture_rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            saved, here = state["cuda"], torch.cuda.device_count()
            if len(saved) != here:
                warnings.warn(f"checkpoint has CUDA RNG states for {len(saved)} devices, this machine has "
                              f"{here}; restoring the first {min(len(saved), here)}")
            for i, s in enumerate(saved[:here]):
                torch.cuda.set_rng_state(s, i)
        else:
            warnings.warn("checkpoint has CUDA RNG states but CUDA is not available; they are not restored")
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def to_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: {what} must be JSON-serialisable; {_json_culprit(obj, what)} is not "
                        f"({e}); convert it (e.g. tensor.item(), .tolist(), str(path))") from e


def _json_culprit(obj: Any, path: str) -> str:
    """The first place in ``obj`` that json cannot write, as ``trainer_state['a'][0]``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{path} key {k!r}"
            found = _json_culprit(v, f"{path}[{k!r}]")
            if found:
                return found
        return ""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _json_culprit(v, f"{path}[{i}]")
            if found:
                return found
        return ""
    return "" if obj is None or isinstance(obj, (str, int, float, bool)) else f"{path} ({type(obj).__name__})"


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
