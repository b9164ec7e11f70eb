"""Crash-safe, checksummed checkpoints of a training run.

Layout of a run directory::

    RUN/checkpoints/step-000040/        one complete checkpoint
        model.safetensors               full state dict (tied weights stored once), with
        config.json, generation_config.json   a transformers model's own (from_pretrained loads it), or
        adapter/                        peft's own save_pretrained output for a PEFT model
        extra/<name>.safetensors        each extra module (critic, value head, ...)
        optimizer.pt, scheduler.pt      torch.save of their state dicts
        rng.pt                          python, numpy, torch CPU (and CUDA / MPS) RNG states
        trainer_state.json              the trainer's own JSON state (step, data position, ...)
        tokenizer/                      optional tokenizer.save_pretrained output
        meta.json                       written last: format, step, what the checkpoint holds, and
                                        the size and sha256 of every other file
    RUN/checkpoints/latest              text file naming the newest checkpoint, e.g. ``step-000040``

Atomicity: a checkpoint is written into a hidden temporary directory beside its final name,
every file and the directory are fsynced, the directory is renamed into place with
``os.replace`` and only then is ``latest`` replaced (temp file + ``os.replace``).  A crash at
any moment therefore leaves ``latest`` naming a complete checkpoint: the previous one or the
new one.  Leftovers of an interrupted save (temporary or half-deleted directories) are hidden
names that :func:`latest_checkpoint` never returns, and are cleaned up by the next save.

Integrity: :func:`verify_checkpoint` checks every file against its recorded size and sha256 and
that ``trainer_state.json``'s step is the directory's; :func:`latest_checkpoint` skips a damaged
checkpoint (with a warning naming the file and why) for the newest intact one, and
:func:`load_checkpoint` verifies before it loads.  Format 1 checkpoints (no checksums) still load.

One process writes a run directory (rank 0 in distributed runs; :mod:`seqpg.rundir.runlock` keeps out
a second writer).  Under ``parallel=fsdp2`` every process writes its own shards instead
(``"weights": "dcp"``, :mod:`seqpg.rundir.checkpoint_dcp`), with the same atomicity and checksums;
:func:`load_checkpoint` and :func:`full_model_state` read both kinds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from .checkpoint_files import (CHECKPOINTS_DIR, FORMAT_VERSION, LATEST_FILE, META_FILE,
                               READABLE_FORMATS, CheckpointDamaged, capture_rng_state, file_checksums,
                               restore_rng_state, step_dir_name)
from .checkpoint_files import (REPLACED_DIR, STEP_DIR, clean_leftovers, complete_checkpoints, file_problem,
                               fsync_tree, is_complete, move_into_place, peft_adapter_names, prune, to_json,
                               write_pointer, write_text)

"""1: no checksums; 2: ``meta.json`` records each file's size and sha256."""
_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")


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
    state_json = to_json(trainer_state, "trainer_state")
    peft_adapters = peft_adapter_names(model)
    if peft_adapters is not None:
        _check_trainable_covered_by_adapters(model, peft_adapters)

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # Capture RNG first, so that nothing done while saving can shift the saved streams.
        rng_state = capture_rng_state() if rng else None
        if peft_adapters is not None:
            model.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
        else:
            save_model(model, str(tmp / "model.safetensors"))
            _save_hf_config(model, tmp)
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
        write_text(tmp / "trainer_state.json", state_json)
        meta = {"format": FORMAT_VERSION, "step": step,
                "weights": "peft" if peft_adapters is not None else "full",
                "adapters": peft_adapters, "extra_modules": sorted(extra_modules),
                "optimizer": optimizer is not None, "scheduler": scheduler is not None,
                "rng": rng, "tokenizer": tokenizer is not None, "files": file_checksums(tmp)}
        write_text(tmp / META_FILE, json.dumps(meta, indent=2))
        fsync_tree(tmp)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_pointer(root, final.name)
    if keep_last is not None:
        prune(root, step, keep_last)
    return final


def _save_hf_config(model: nn.Module, folder: Path) -> None:
    """A transformers model's config.json and generation_config.json, so from_pretrained(folder) loads it."""
    for part in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if hasattr(part, "save_pretrained") and hasattr(part, "to_json_string"):
            part.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------------


def checkpoint_to_resume(run_dir: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint a run continues from: ``run_dir``'s latest intact one with ``resume``, None without;
    ``resume`` with none there is a FileNotFoundError that says to start without it."""
    if not resume:
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints; start without --resume")
    return ckpt


def latest_checkpoint(run_dir: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (normally what ``latest`` names), or None if there is none.

    If ``latest`` is missing or names an incomplete directory (a crash between the steps of a
    save), the complete checkpoint with the highest step is taken instead.  With ``verify`` each
    candidate is checked by :func:`verify_checkpoint`; a damaged one is skipped for the next
    older one, with a warning naming the file and why.  Raises :class:`CheckpointDamaged` when
    checkpoints exist but none is intact.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = complete_checkpoints(root)  # sorted by step
    candidates = [p for _, p in reversed(found)]
    pointer = root / LATEST_FILE
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target):
            at = _dir_step(target)
            candidates = [target] + [p for s, p in reversed(found) if p != target and (at is None or s < at)]
        else:
            warnings.warn(f"{pointer} names {target.name!r}, which is missing or incomplete; "
                          "using the newest complete checkpoint instead")
    if not verify:
        return candidates[0] if candidates else None
    damaged = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            damaged.append(str(e))
            continue
        if damaged:
            warnings.warn(f"skipping damaged checkpoint(s): {'; '.join(damaged)}; using {path} instead")
        return path
    if damaged:
        raise CheckpointDamaged(f"no intact checkpoint under {root}: {'; '.join(damaged)}; start a new run_dir, "
                                "or restore the files from a copy")
    return None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory against its ``meta.json``; return the meta or raise :class:`CheckpointDamaged`.

    Checked: every file recorded in ``meta.json`` exists with its size and sha256 (format 2;
    format 1 recorded none), and the step in ``meta.json`` and ``trainer_state.json`` is the
    one in the directory's name (``step-000040``).  The message names the file and what is wrong.
    """
    ckpt = Path(path)
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{ckpt / META_FILE}: cannot be read ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{ckpt / META_FILE}: not a JSON object")
    _check_format(ckpt, meta)
    if meta["format"] >= 2:
        if not isinstance(meta.get("files"), dict):
            raise CheckpointDamaged(f"{ckpt / META_FILE}: has no 'files' record of sizes and checksums")
        for rel, want in sorted(meta["files"].items()):
            problem = file_problem(ckpt / rel, want)
            if problem:
                raise CheckpointDamaged(f"{ckpt / rel}: {problem}")
    dir_step = _dir_step(ckpt)
    if dir_step is not None and meta.get("step") != dir_step:
        raise CheckpointDamaged(f"{ckpt / META_FILE}: says step {meta.get('step')!r} but the directory is "
                                f"{ckpt.name}")
    state = _read_trainer_state(ckpt)
    want_step = meta.get("step") if dir_step is None else dir_step
    if "step" in state and state["step"] != want_step:
        raise CheckpointDamaged(f"{ckpt / 'trainer_state.json'}: says step {state['step']!r} but the checkpoint "
                                f"is of step {want_step}")
    return meta


def _dir_step(ckpt: Path) -> int | None:
    """The step in a checkpoint directory's name (``step-000040`` or its ``.replaced`` copy), else None."""
    m = STEP_DIR.match(ckpt.name) or REPLACED_DIR.match(ckpt.name)
    return int(m.group(1)) if m else None


def _read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointDamaged(f"{path}: not a JSON object")
    return state


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra_modules: Mapping[str, nn.Module] | None = None, scheduler: Any | None = None,
                    restore_rng: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint into existing objects and return its ``trainer_state``.

    ``path`` is a checkpoint directory or a run directory (its newest intact checkpoint is
    used).  ``model`` must have the checkpoint's structure (for a PEFT checkpoint: the same base
    model wrapped with the same adapters).  Tensors are read on the CPU and copied into the
    objects' own devices.  ``optimizer``, ``scheduler`` and each of ``extra_modules`` are loaded
    when given; ``restore_rng`` resets the global python / numpy / torch RNGs to the saved
    streams.  ``verify`` first checks sizes, checksums and steps (:func:`verify_checkpoint`); a
    damaged file raises :class:`CheckpointDamaged` naming it.
    """
    ckpt = resolve_checkpoint(path, verify=verify)
    meta = verify_checkpoint(ckpt) if verify and Path(path) == ckpt else _read_meta(ckpt)
    if meta["weights"] == "dcp":  # sharded (parallel=fsdp2): see seqpg.rundir.checkpoint_dcp
        from .checkpoint_dcp import load_sharded_checkpoint

        return load_sharded_checkpoint(ckpt, meta, modules={"policy": model, **(extra_modules or {})},
                                       optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    if meta["weights"] == "peft":
        _load_peft(ckpt, meta, model)
    else:
        if peft_adapter_names(model) is not None:
            raise ValueError(f"{ckpt} holds a full (non-PEFT) model but the model given is a PEFT model; "
                             "load it into the plain base model")
        _load_safetensors(model, ckpt / "model.safetensors")
    for name, module in (extra_modules or {}).items():
        if name not in meta["extra_modules"]:
            raise KeyError(f"{ckpt} has no extra module {name!r}; it holds {meta['extra_modules'] or 'none'}")
        _load_safetensors(module, ckpt / "extra" / f"{name}.safetensors")
    for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if obj is None:
            continue
        if not meta[key]:
            raise FileNotFoundError(f"{ckpt} was saved without {key} state ({key}=None), so none can be loaded; "
                                    f"pass {key}=None to load_checkpoint")
        state = _torch_load(ckpt / f"{key}.pt")
        try:
            obj.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{ckpt}/{key}.pt does not fit the {key} given: {e}") from e
    if restore_rng:
        if meta["rng"]:
            restore_rng_state(_torch_load(ckpt / "rng.pt"))
        else:
            warnings.warn(f"{ckpt} was saved with rng=False; the random streams are not restored")
    return _read_trainer_state(ckpt)


def _torch_load(path: Path) -> Any:
    """``torch.load`` of a checkpoint file (tensors and plain data only); an unreadable file is named as such."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path}: missing") from None
    except Exception as e:  # noqa: BLE001 -- torch's own message would advise weights_only=False
        raise CheckpointDamaged(f"{path}: cannot be read as a torch file ({type(e).__name__}); it is "
                                "truncated or damaged") from None


def _load_safetensors(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError

    try:
        load_model(module, str(path), strict=True)
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path}: missing") from None
    except SafetensorError as e:
        raise CheckpointDamaged(f"{path}: cannot be read as safetensors ({e}); it is truncated or damaged") from None


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
    meta = verify_checkpoint(ckpt)
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


def resolve_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Path:
    """A checkpoint directory from a checkpoint or run directory; a clear error if there is none.

    A run directory gives its newest intact checkpoint (:func:`latest_checkpoint`); a checkpoint
    directory is returned as it is.
    """
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    found = latest_checkpoint(p, verify=verify)
    if found is None and p.name == CHECKPOINTS_DIR:
        found = latest_checkpoint(p.parent, verify=verify)
    if found is None:
        raise FileNotFoundError(
            f"No checkpoint at {p}: expected a checkpoint directory containing {META_FILE} (e.g. "
            f"RUN/{CHECKPOINTS_DIR}/step-000040) or a run directory with a complete checkpoint under "
            f"RUN/{CHECKPOINTS_DIR}/, as written by save_checkpoint")
    return found


def _read_meta(ckpt: Path) -> dict[str, Any]:
    meta = json.loads((ckpt / META_FILE).read_text())
    _check_format(ckpt, meta)
    return meta


def _check_format(ckpt: Path, meta: Mapping[str, Any]) -> None:
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{ckpt}/{META_FILE}: checkpoint format {meta.get('format')!r} is not a format "
                         f"this seqpg reads {READABLE_FORMATS}; load it with the seqpg version that wrote it")


# ---------------------------------------------------------------------------------------------
# PEFT models
# ---------------------------------------------------------------------------------------------


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

    adapters = peft_adapter_names(model)
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


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


