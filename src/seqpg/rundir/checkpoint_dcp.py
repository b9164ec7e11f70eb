"""Sharded checkpoints: every process writes its own shards with torch.distributed.checkpoint (DCP).

Under ``parallel=fsdp2`` no process ever holds the whole model, so none gathers it to save:
each writes the shards it owns.  A sharded checkpoint (``meta.json``: ``"weights": "dcp"``)::

    RUN/checkpoints/step-000040/
        dcp/.metadata, dcp/__R_0.distcp   DCP's files: {"model": {"policy.<name>": ..., "critic.<name>": ...},
                                          "optim": optimizer state keyed by those names}
        rng/rank-00001.pt                 each process's RNG streams, written by that process
        scheduler.pt, trainer_state.json, tokenizer/     written by rank 0, as in a full checkpoint
        meta.json                         written last, by rank 0; ``files``: the sha256 of every file

Atomicity is that of :func:`seqpg.rundir.checkpoint.save_checkpoint`: rank 0 creates the hidden
temporary directory and tells the others its name; every process writes its shards and RNG
streams into it; once all have written (DCP's own collective completion, then a barrier),
rank 0 writes the small files and ``meta.json``, fsyncs, renames the directory into place and
only then replaces ``latest``.  A kill of any process at any moment leaves ``latest`` naming a
complete checkpoint; what an interrupted save left is removed by the next save.  The run
directory must be one file system that every process writes (a shared one across machines).

Loading reshards: DCP reads, for each tensor of the objects given, the pieces that this
process's shard (or a whole tensor, in one process) needs, whatever number of processes wrote
them.  So a checkpoint written by N processes resumes with M (any M, DDP, FSDP2 or one process),
and loading makes no collective calls.  Every process restores its own RNG file when the
checkpoint has one for its rank, and rank 0's otherwise (the trainer keeps the global streams
equal on every process).  A PEFT model saves its trainable (adapter) tensors only, as a full
checkpoint does.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.distributed as tdist
from torch import nn

from .checkpoint_files import (CHECKPOINTS_DIR, FORMAT_VERSION, META_FILE, clean_leftovers, fsync_tree,
                               move_into_place, peft_adapter_names, prune, to_json, write_pointer, write_text,
                               capture_rng_state, file_checksums, restore_rng_state, step_dir_name)

if TYPE_CHECKING:
    from ..training.distributed import DistContext

WEIGHTS_KIND = "dcp"
DCP_DIR = "dcp"
RNG_DIR = "rng"


def rng_file_name(rank: int) -> str:
    return f"{RNG_DIR}/rank-{rank:05d}.pt"


def is_sharded_checkpoint(ckpt: Path) -> bool:
    """Whether the checkpoint directory ``ckpt`` was written by :func:`save_sharded_checkpoint`."""
    return json.loads((Path(ckpt) / META_FILE).read_text()).get("weights") == WEIGHTS_KIND


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_sharded_checkpoint(run_dir: str | os.PathLike, step: int, *, modules: Mapping[str, nn.Module],
                            optimizer: torch.optim.Optimizer | None, dist: DistContext,
                            trainer_state: Mapping[str, Any] | None = None, scheduler: Any | None = None,
                            rng: bool = True, keep_last: int | None = 2, tokenizer: Any | None = None) -> Path:
    """Write the sharded checkpoint of ``step``; every process calls this (collective). Returns its path.

    ``modules`` maps names to the trained modules (``"policy"`` first, then extra modules such
    as ``"critic"``), FSDP2-sharded or plain; ``optimizer`` covers their trainable parameters.
    The other arguments are those of :func:`seqpg.rundir.checkpoint.save_checkpoint`, whose rules they
    follow (JSON ``trainer_state``, ``keep_last``).
    """
    if "policy" not in modules:
        raise ValueError(f"save_sharded_checkpoint: modules must include 'policy'; got {sorted(modules)}")
    trainer_state = dict(trainer_state or {})
    if trainer_state.get("step", step) != step:
        raise ValueError(f"save_sharded_checkpoint: trainer_state['step']={trainer_state['step']!r} but "
                         f"step={step}; pass the same step to both")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_sharded_checkpoint: keep_last must be >= 1 or None (keep all), got {keep_last}")
    state_json = to_json(trainer_state, "trainer_state")
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    tmp_name = None
    with dist.fail_together("checkpoint"):
        rng_state = capture_rng_state() if rng else None  # first, so that saving cannot shift the saved streams
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            clean_leftovers(root)
            tmp_name = f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
            (root / tmp_name / RNG_DIR).mkdir(parents=True)
    tmp = root / dist.gather_objects(tmp_name)[0]
    try:
        with dist.fail_together("checkpoint"):
            state = _state_dict(modules, optimizer)
        with _single_process_is_meant():  # DCP reports a failed write on any process to all of them
            _dcp().save(state, storage_writer=_dcp().FileSystemWriter(str(tmp / DCP_DIR), sync_files=True),
                        no_dist=not dist.enabled)
        with dist.fail_together("checkpoint"):
            if rng_state is not None:
                _save_synced(rng_state, tmp / rng_file_name(dist.rank))
        with dist.fail_together("checkpoint"):  # every process has written all it writes: list and hash
            shared = _files_under(tmp, (DCP_DIR, RNG_DIR))
            digests = file_checksums(tmp, shared[dist.rank::dist.world_size])  # the hashing is shared out too
        digests = {k: v for part in dist.gather_objects(digests) for k, v in part.items()}
        with dist.fail_together("checkpoint"):
            if dist.is_main:
                _finish(tmp, final, step, modules, optimizer, scheduler, tokenizer, state_json, rng, dist.world_size,
                        digests, keep_last)
    except BaseException:
        if dist.is_main:  # the others have stopped writing: every failure above reaches all processes
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _finish(tmp: Path, final: Path, step: int, modules, optimizer, scheduler, tokenizer, state_json: str, rng: bool,
            world_size: int, digests: dict[str, str], keep_last: int | None) -> None:
    """Rank 0, once every process has written its shards: small files, meta.json, rename, pointer."""
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    write_text(tmp / "trainer_state.json", state_json)
    own = _files_under(tmp, ("scheduler.pt", "tokenizer", "trainer_state.json"))
    digests = dict(sorted({**digests, **file_checksums(tmp, own)}.items()))
    meta = {"format": FORMAT_VERSION, "step": step, "weights": WEIGHTS_KIND,
            "adapters": peft_adapter_names(modules["policy"]),
            "extra_modules": sorted(n for n in modules if n != "policy"),
            "optimizer": optimizer is not None, "scheduler": scheduler is not None, "rng": rng,
            "tokenizer": tokenizer is not None, "world_size": world_size, "files": digests}
    write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    fsync_tree(tmp)
    move_into_place(tmp, final)
    write_pointer(final.parent, final.name)
    if keep_last is not None:
        prune(final.parent, step, keep_last)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_sharded_checkpoint(ckpt: Path, meta: Mapping[str, Any], *, modules: Mapping[str, nn.Module],
                            optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                            restore_rng: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint into ``modules`` (FSDP2-sharded or plain) and the optimizer; no collectives.

    Called by :func:`seqpg.rundir.checkpoint.load_checkpoint`, whose arguments these are (``modules``:
    ``{"policy": model, **extra_modules}``), which has verified the checkpoint's files already
    (``verify_checkpoint``, through ``latest_checkpoint`` or itself).  Returns the trainer state.
    """
    rank, _ = _rank_and_world()
    for name in modules:
        if name != "policy" and name not in meta["extra_modules"]:
            raise KeyError(f"{ckpt} has no extra module {name!r}; it holds {meta['extra_modules'] or 'none'}")
    adapters = peft_adapter_names(modules["policy"])
    if adapters != meta["adapters"]:
        raise ValueError(f"{ckpt} holds " + (f"adapters {meta['adapters']}" if meta["adapters"] else "a full model")
                         + " but the model given has " + (f"adapters {adapters}" if adapters else "none")
                         + "; build the model as the run did (the same base model and LoRA settings)")
    if optimizer is not None and not meta["optimizer"]:
        raise FileNotFoundError(f"{ckpt} was saved without optimizer state, so none can be loaded; "
                                "pass optimizer=None to load_checkpoint")
    state = _state_dict(modules, optimizer)
    with _single_process_is_meant():
        _dcp().load(state, storage_reader=_dcp().FileSystemReader(str(ckpt / DCP_DIR)), no_dist=True)
    _set_state_dict(modules, optimizer, state, ckpt)
    if scheduler is not None:
        if not meta["scheduler"]:
            raise FileNotFoundError(f"{ckpt} was saved without scheduler state, so none can be loaded; "
                                    "pass scheduler=None to load_checkpoint")
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng and meta["rng"]:
        own = ckpt / rng_file_name(rank)
        restore_rng_state(torch.load(own if own.is_file() else ckpt / rng_file_name(0), map_location="cpu",
                                weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def full_state_dict(ckpt: Path, module: str = "policy") -> dict[str, torch.Tensor]:
    """Every tensor a sharded checkpoint holds for ``module``, whole and on the CPU, under the
    module's own ``state_dict()`` names; in this process, without a process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _dcp().FileSystemReader(str(ckpt / DCP_DIR))
    prefix = f"model.{module}."
    full = {key: torch.empty(md.size, dtype=md.properties.dtype)
            for key, md in reader.read_metadata().state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not full:
        raise KeyError(f"{ckpt} holds no tensors of module {module!r}")
    with _single_process_is_meant():
        _dcp().load(full, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: t for key, t in full.items()}


# ---------------------------------------------------------------------------------------------
# State dicts: one flat dict of named modules, and the optimizer keyed by the same names
# ---------------------------------------------------------------------------------------------

def _state_dict(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: this process's shards (live tensors, or whole ones for a
    plain module); DCP writes them, or loads into them in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    box, options = _box(modules), _options(modules)
    if optimizer is None:
        return {"model": get_model_state_dict(box, options=options)}
    model_state, optim_state = get_state_dict(box, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def _set_state_dict(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], ckpt: Path) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    box, options = _box(modules), _options(modules)
    if optimizer is None:
        result = set_model_state_dict(box, state["model"], options=options)
    else:
        result = set_state_dict(box, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=options)
    frozen = {n for n, p in box.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{ckpt}: the checkpoint does not match the modules given: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def _box(modules: Mapping[str, nn.Module]) -> nn.Module:
    """The modules under one root, so that names are ``policy.<name>``, ``critic.<name>``."""
    return nn.ModuleDict(dict(modules))


def _options(modules: Mapping[str, nn.Module]):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    peft = peft_adapter_names(modules["policy"]) is not None
    # a PEFT model: its adapters only (the frozen base weights are those of the base model it is built from)
    return StateDictOptions(ignore_frozen_params=peft, strict=not peft)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


@contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that it works in one process: here that is asked for (``no_dist``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank_and_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------------------------------------
# Files and their checksums
# ---------------------------------------------------------------------------------------------

def _files_under(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``folder``, '/'-separated, sorted) of the files at or under ``names``."""
    out = []
    for name in names:
        p = folder / name
        if p.is_file():
            out.append(name)
        elif p.is_dir():
            out += [f.relative_to(folder).as_posix() for f in p.rglob("*") if f.is_file()]
    return sorted(out)


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
