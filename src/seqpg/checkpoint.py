"""Crash-safe checkpoints of a training run, and a Ctrl-C flag that ends a run with one.

Layout of a run directory::

    RUN/checkpoints/step-000040/        one complete checkpoint
        model.safetensors               full state dict (tied weights stored once), or
        adapter/                        peft's own save_pretrained output for a PEFT model
        extra/<name>.safetensors        each extra module (critic, value head, ...)
        optimizer.pt, scheduler.pt      torch.save of their state dicts
        rng.pt                          python, numpy, torch CPU (and CUDA / MPS) RNG states
        trainer_state.json              the trainer's own JSON state (step, data position, ...)
        tokenizer/                      optional tokenizer.save_pretrained output
        meta.json                       written last: format, step, what the checkpoint holds
    RUN/checkpoints/latest              text file naming the newest checkpoint, e.g. ``step-000040``

Atomicity: a checkpoint is written into a hidden temporary directory beside its final name,
every file and the directory are fsynced, the directory is renamed into place with
``os.replace`` and only then is ``latest`` replaced (temp file + ``os.replace``).  A crash at
any moment therefore leaves ``latest`` naming a complete checkpoint: the previous one or the
new one.  Leftovers of an interrupted save (temporary or half-deleted directories) are hidden
names that :func:`latest_checkpoint` never returns, and are cleaned up by the next save.

One process writes a run directory (rank 0 in distributed runs).  Under ``parallel=fsdp2`` every
process writes its own shards instead (``"weights": "dcp"``, :mod:`seqpg.checkpoint_dcp`), with the
same atomicity; :func:`load_checkpoint` and :func:`full_model_state` read both kinds.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_REPLACED_DIR = re.compile(r"^step-(\d+)\.replaced$")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")


def step_dir_name(step: int) -> str:
    """``step-000040``: the directory name of the checkpoint taken after step ``step``."""
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None,
                    extra_modules: Mapping[str, nn.Module] | None = None,
                    trainer_state: Mapping[str, Any] | None = None, scheduler: Any | None = None,
                    rng: bool = True, keep_last: int | None = 2, tokenizer: Any | None = None) -> Path:
    """Write the checkpoint of step ``step`` atomically under ``run_dir/checkpoints``; return its path.

    ``model`` must be the unwrapped module (not DDP/FSDP-wrapped).  A ``peft.PeftModel`` saves
    its adapters only (peft's ``save_pretrained``); any other module its full state dict, tied
    weights once.  ``trainer_state`` must be JSON-serialisable; a ``"step"`` entry in it must equal
    ``step``.  ``scheduler`` is anything with ``state_dict()`` (an LR scheduler).  After the new
    checkpoint is in place, ``keep_last`` (None: keep all) keeps it and the ``keep_last - 1``
    newest older ones; checkpoints of steps *after* ``step`` (left by a run that crashed and was
    resumed from an earlier checkpoint) are removed too.
    """
    extra_modules = dict(extra_modules or {})
    trainer_state = dict(trainer_state or {})
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None (keep all), got {keep_last}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"save_checkpoint: trainer_state['step']={trainer_state['step']!r} but step={step}; "
                         "pass the same step to both")
    for name in extra_modules:
        if not _NAME_OK.match(name):
            raise ValueError(f"save_checkpoint: extra module name {name!r} is not a safe file name; "
                             "use letters, digits, '_', '.', '-'")
    state_json = _to_json(trainer_state, "trainer_state")
    peft_adapters = _peft_adapter_names(model)
    if peft_adapters is not None:
        _check_trainable_covered_by_adapters(model, peft_adapters)

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # Capture RNG first, so that nothing done while saving can shift the saved streams.
        rng_state = _capture_rng() if rng else None
        if peft_adapters is not None:
            model.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        if extra_modules:
            (tmp / "extra").mkdir()
        for name, module in extra_modules.items():
            save_model(module, str(tmp / "extra" / f"{name}.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if rng_state is not None:
            torch.save(rng_state, tmp / "rng.pt")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _write_text(tmp / "trainer_state.json", state_json)
        meta = {"format": FORMAT_VERSION, "step": step,
                "weights": "peft" if peft_adapters is not None else "full",
                "adapters": peft_adapters, "extra_modules": sorted(extra_modules),
                "optimizer": optimizer is not None, "scheduler": scheduler is not None,
                "rng": rng, "tokenizer": tokenizer is not None}
        _write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(root, final.name)
    if keep_last is not None:
        _prune(root, step, keep_last)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is swapped out.

    The old copy is renamed to ``step-N.replaced`` first, so that during the two renames a
    complete checkpoint of step N exists under a name :func:`latest_checkpoint` falls back to.
    """
    if final.exists():
        old = final.with_name(final.name + ".replaced")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        _fsync_dir(final.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _discard(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    _write_text(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep the checkpoint of ``step`` and the ``keep_last - 1`` newest older ones."""
    found = _complete_checkpoints(root)  # sorted by step
    older = [p for s, p in found if s < step]
    newer = [p for s, p in found if s > step]
    doomed = older[:max(0, len(older) - (keep_last - 1))] + newer
    for path in doomed:
        _discard(path)


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: rename it to a hidden name first, so it never looks torn."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove what an interrupted save left: temp dirs, trash, swapped-out copies of a step."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-", f".{LATEST_FILE}.tmp-")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif _REPLACED_DIR.match(p.name):
            twin = p.with_name(p.name[: -len(".replaced")])
            if _is_complete(twin):
                shutil.rmtree(p, ignore_errors=True)
            elif _is_complete(p):  # the crash came between the two renames: put the old copy back
                if twin.exists():
                    shutil.rmtree(twin)
                os.replace(p, twin)
                _fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------------

def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (what ``latest`` names), or None if there is none.

    If ``latest`` is missing or names an incomplete directory (a crash between the steps of a
    save), the complete checkpoint with the highest step is returned instead.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if _is_complete(target):
            return target
        warnings.warn(f"{pointer} names {target.name!r}, which is missing or incomplete; "
                      "using the newest complete checkpoint instead")
    found = _complete_checkpoints(root)
    return max(found)[1] if found else None


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra_modules: Mapping[str, nn.Module] | None = None, scheduler: Any | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into existing objects and return its ``trainer_state``.

    ``path`` is a checkpoint directory or a run directory (its latest checkpoint is used).
    ``model`` must have the checkpoint's structure (for a PEFT checkpoint: the same base model
    wrapped with the same adapters).  Tensors are read on the CPU and copied into the objects'
    own devices.  ``optimizer``, ``scheduler`` and each of ``extra_modules`` are loaded when
    given; ``restore_rng`` resets the global python / numpy / torch RNGs to the saved streams.
    """
    ckpt = resolve_checkpoint(path)
    meta = _read_meta(ckpt)
    if meta["weights"] == "dcp":  # sharded (parallel=fsdp2): see seqpg.checkpoint_dcp
        from .checkpoint_dcp import load_sharded_checkpoint

        return load_sharded_checkpoint(ckpt, meta, modules={"policy": model, **(extra_modules or {})},
                                       optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    if meta["weights"] == "peft":
        _load_peft(ckpt, meta, model)
    else:
        if _peft_adapter_names(model) is not None:
            raise ValueError(f"{ckpt} holds a full (non-PEFT) model but the model given is a PEFT model; "
                             "load it into the plain base model")
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
    for name, module in (extra_modules or {}).items():
        if name not in meta["extra_modules"]:
            raise KeyError(f"{ckpt} has no extra module {name!r}; it holds {meta['extra_modules'] or 'none'}")
        load_model(module, str(ckpt / "extra" / f"{name}.safetensors"), strict=True)
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if not meta[key]:
            raise FileNotFoundError(f"{ckpt} was saved without {key} state ({key}=None), so none can be loaded; "
                                    f"pass {key}=None to load_checkpoint")
        try:
            obj.load_state_dict(torch.load(ckpt / f"{key}.pt", map_location="cpu", weights_only=True))
        except ValueError as e:
            raise ValueError(f"{ckpt}/{key}.pt does not fit the {key} given: {e}") from e
    if restore_rng:
        if meta["rng"]:
            _restore_rng(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
        else:
            warnings.warn(f"{ckpt} was saved with rng=False; the random streams are not restored")
    return json.loads((ckpt / "trainer_state.json").read_text())


def full_model_state(path: str | os.PathLike, module: str = "policy") -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds for ``module`` (``"policy"`` or an extra module's name), whole,
    on the CPU, in this process (no process group needed), keyed by the module's ``state_dict()`` names.

    ``path`` is a checkpoint or run directory.  By the checkpoint's kind (``meta.json``'s ``weights``):
    ``full``: the safetensors file (tied weights once, under one of their names); ``dcp`` (sharded,
    written by any number of processes): every tensor reassembled from the shards; for a LoRA policy,
    both ``dcp`` and ``peft`` hold the adapter tensors only (``peft``: as peft's ``save_pretrained``
    names them, for ``PeftModel.from_pretrained`` or ``set_peft_model_state_dict``), not the frozen base.
    """
    ckpt = resolve_checkpoint(path)
    meta = _read_meta(ckpt)
    if module != "policy" and module not in meta["extra_modules"]:
        raise KeyError(f"{ckpt} has no module {module!r}; it holds policy and {meta['extra_modules'] or 'no others'}")
    if meta["weights"] == "dcp":
        from .checkpoint_dcp import full_state_dict

        return full_state_dict(ckpt, module)
    if module != "policy":
        return load_file(str(ckpt / "extra" / f"{module}.safetensors"), device="cpu")
    if meta["weights"] == "peft":
        if meta["adapters"] != ["default"]:
            raise ValueError(f"{ckpt} holds adapters {meta['adapters']}; read each one's folder under "
                             f"{ckpt / 'adapter'} with peft")
        return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device="cpu")
    return load_file(str(ckpt / "model.safetensors"), device="cpu")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a checkpoint or run directory; a clear error if there is none."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    found = latest_checkpoint(p)
    if found is None and p.name == CHECKPOINTS_DIR:
        found = latest_checkpoint(p.parent)
    if found is None:
        raise FileNotFoundError(
            f"No checkpoint at {p}: expected a checkpoint directory containing {META_FILE} (e.g. "
            f"RUN/{CHECKPOINTS_DIR}/step-000040) or a run directory with a complete checkpoint under "
            f"RUN/{CHECKPOINTS_DIR}/, as written by save_checkpoint")
    return found


def _read_meta(ckpt: Path) -> dict[str, Any]:
    meta = json.loads((ckpt / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{ckpt}/{META_FILE}: checkpoint format {meta.get('format')!r} is not the format "
                         f"this seqpg reads ({FORMAT_VERSION}); load it with the seqpg version that wrote it")
    return meta


def _is_complete(path: Path) -> bool:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint; a step's swapped-out copy only when its own is absent."""
    own, replaced = {}, {}
    for p in root.iterdir():
        for pattern, into in ((_STEP_DIR, own), (_REPLACED_DIR, replaced)):
            m = pattern.match(p.name)
            if m and _is_complete(p):
                into[int(m.group(1))] = p
    return sorted({**replaced, **own}.items())


# ---------------------------------------------------------------------------------------------
# PEFT models
# ---------------------------------------------------------------------------------------------

def _peft_adapter_names(model: nn.Module) -> list[str] | None:
    """The adapter names of a ``peft.PeftModel``, or None for any other module."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return sorted(model.peft_config) if isinstance(model, PeftModel) else None


def _check_trainable_covered_by_adapters(model: nn.Module, adapters: list[str]) -> None:
    """peft saves adapter weights only: a trainable base parameter would be silently dropped."""
    lost = [n for n, p in model.named_parameters()
            if p.requires_grad and not any(f".{a}." in n + "." for a in adapters)]
    if lost:
        raise ValueError(f"save_checkpoint: {len(lost)} trainable parameters are not part of a PEFT adapter and "
                         f"would not be saved (e.g. {lost[:3]}); add their modules to the adapter config's "
                         "modules_to_save, or freeze them")


def _load_peft(ckpt: Path, meta: Mapping[str, Any], model: nn.Module) -> None:
    from peft import set_peft_model_state_dict

    adapters = _peft_adapter_names(model)
    if adapters is None:
        raise ValueError(f"{ckpt} holds PEFT adapter weights but the model given is not a peft.PeftModel; "
                         "wrap the base model with the same adapter config (peft.get_peft_model) first")
    if adapters != meta["adapters"]:
        raise ValueError(f"{ckpt} holds adapters {meta['adapters']} but the model has {adapters}")
    for name in adapters:
        folder = ckpt / "adapter" / ("" if name == "default" else name)
        weights = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        absent = [k for k in result.missing_keys if f".{name}." in k + "."]
        if result.unexpected_keys or absent:
            raise RuntimeError(f"{folder}: adapter {name!r} does not match the model: "
                               f"unexpected {result.unexpected_keys[:5]}, missing {absent[:5]}")


# ---------------------------------------------------------------------------------------------
# RNG streams
# ---------------------------------------------------------------------------------------------

def _capture_rng() -> dict[str, Any]:
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


def _restore_rng(state: Mapping[str, Any]) -> None:
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


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _to_json(obj: Any, what: str) -> str:
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


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Ctrl-C: finish the step, save, stop
# ---------------------------------------------------------------------------------------------

class StopFlag:
    """Turns SIGINT (Ctrl-C) into a request to stop after the current step.

    Used as a context manager around the training loop::

        with StopFlag() as stop:
            for step in ...:
                train_step(...)
                if stop.is_set():
                    save_checkpoint(...)
                    break

    Inside the block the first signal only sets the flag (and says so on stderr); a second one
    raises ``KeyboardInterrupt`` as usual, for when the step itself hangs.  The previous
    handlers are restored on exit.  Outside the main thread no handler can be installed: the
    flag then only reacts to :meth:`set`.  ``signals`` may add ``signal.SIGTERM`` (preemption).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,), announce: bool = True):
        self.signals = tuple(signals)
        self.announce = announce
        self.received: int | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self.is_set()

    def set(self) -> None:
        self._event.set()

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                  "and stopping (press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
