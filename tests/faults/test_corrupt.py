"""Damaged checkpoints: flipped bytes, truncated files, a lying trainer_state.json. Each is named with the reason,
and --resume falls back to the newest intact checkpoint and ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from faultkit import maths, resume, weights_sha

from seqpg.rundir.checkpoint import latest_checkpoint, load_checkpoint, verify_checkpoint
from seqpg.rundir.checkpoint_files import CheckpointDamaged, file_checksums
from safetensors import safe_open

from seqpg.model.loading import build_tiny_model


def _tiny_model_of(ckpt):
    """A tiny model shaped like the one the checkpoint holds."""
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        vocab_size = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    return build_tiny_model(vocab_size)


def _flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _lie_about_step(path) -> None:
    """step 99 in a checkpoint of step 4, with a matching checksum: as a faulty writer would leave it."""
    state = json.loads(path.read_text())
    path.write_text(json.dumps(dict(state, step=99)))
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"][path.name] = file_checksums(path.parent)[path.name]
    meta_path.write_text(json.dumps(meta))


_DAMAGE = {  # case -> (file in step-000004, how, what the warning says)
    "weights_flipped": ("model.safetensors", _flip, "sha256 differs"),
    "optimizer_flipped": ("optimizer.pt", _flip, "sha256 differs"),
    "optimizer_truncated": ("optimizer.pt", _truncate, "truncated or damaged"),
    "rng_missing": ("rng.pt", os.remove, "missing"),
    "trainer_state_step_99": ("trainer_state.json", _lie_about_step, "says step 99 but the checkpoint is of step 4"),
}


@pytest.mark.parametrize("case", list(_DAMAGE))
def test_damaged_checkpoint_is_named_and_skipped(case, reference, copy_of):
    run = copy_of(reference)
    name, damage, reason = _DAMAGE[case]
    damage(run / "checkpoints" / "step-000004" / name)
    with pytest.warns(UserWarning, match=f"step-000004/{name}: .*{reason}.*; using .*step-000002 instead"):
        assert latest_checkpoint(run).name == "step-000002"
    with pytest.raises(CheckpointDamaged, match=f"step-000004/{name}: .*{reason}"):
        load_checkpoint(run / "checkpoints" / "step-000004", model=torch.nn.Linear(1, 1))  # verified before use


@pytest.mark.parametrize("case", ["weights_flipped", "trainer_state_step_99"])
def test_resume_falls_back_to_the_intact_checkpoint_exactly(case, reference, copy_of, prompt_file):
    run = copy_of(reference)
    name, damage, _ = _DAMAGE[case]
    damage(run / "checkpoints" / "step-000004" / name)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint.*{name}"):
        result = resume(prompt_file, run)
    assert result.steps_done == 4  # not "99 steps done"
    assert maths(run) == maths(reference)
    assert weights_sha(run) == weights_sha(reference)
    verify_checkpoint(latest_checkpoint(run))  # the damaged step-4 checkpoint was replaced


def test_no_intact_checkpoint_is_an_error_listing_each(reference, copy_of):
    run = copy_of(reference)
    _flip(run / "checkpoints" / "step-000004" / "model.safetensors")
    _truncate(run / "checkpoints" / "step-000002" / "optimizer.pt")
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint.*step-000004/model.safetensors.*"
                                                "step-000002/optimizer.pt"):
        latest_checkpoint(run)


def test_format_1_checkpoint_without_checksums_loads_and_a_truncated_file_gets_seqpgs_message(reference, copy_of):
    run = copy_of(reference)
    ckpt = run / "checkpoints" / "step-000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(dict(meta, format=1)))
    model = _tiny_model_of(ckpt)
    opt = torch.optim.AdamW(model.parameters())
    assert load_checkpoint(ckpt, model=model, optimizer=opt, restore_rng=False)["step"] == 4
    _truncate(ckpt / "optimizer.pt")
    with pytest.raises(CheckpointDamaged, match="optimizer.pt: cannot be read as a torch file") as err:
        load_checkpoint(ckpt, model=model, optimizer=opt, restore_rng=False)
    assert "weights_only" not in str(err.value)
