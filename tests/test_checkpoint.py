"""Checkpoints: exact round trips (weights, optimizer, scheduler, RNG streams), tied and PEFT models,
pruning, atomicity under failures at every stage and under SIGKILL, and the Ctrl-C stop flag."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import seqpg.rundir.checkpoint as ckpt_mod
from seqpg.rundir.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from seqpg.rundir.signals import StopFlag


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, sched=None) -> None:
    for _ in range(n):
        x = torch.randn(6, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()


def _tiny_llama(seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _lm_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 64, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k])), (i, k)


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


class _FakeTokenizer:
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        Path(path, "tokenizer.json").write_text('{"fake": true}')


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

def test_round_trip_restores_weights_optimizer_scheduler_rng_and_state(tmp_path):
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _train_steps(model, opt, 3, sched)
    state = {"step": 3, "prompt_stream": {"epoch": 1, "pos": 7, "order": [3, 1, 2]}, "kl": {"value": 0.05}}
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, trainer_state=state,
                           tokenizer=_FakeTokenizer())
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert latest_checkpoint(tmp_path) == path
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    sched_at_save, saved = sched.state_dict(), _snapshot(model)
    _train_steps(model, opt, 1, sched)  # the original run goes on: one more step ...
    continued = _snapshot(model)
    expected_draws = _draws()  # ... then draws from every RNG

    model2 = _mlp(1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    got = load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2)
    assert got == state
    _assert_same_state(_snapshot(model2), saved)
    assert sched2.state_dict() == sched_at_save and sched_at_save["last_epoch"] == 3
    # Resuming reproduces the original run exactly: same data from the RNG, same optimizer
    # moments, and the RNG streams are where the original's are afterwards.
    _train_steps(model2, opt2, 1, sched2)
    _assert_same_state(_snapshot(model2), continued)
    _assert_same_optimizer(opt, opt2)
    assert _draws() == expected_draws
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_restore_rng_false_leaves_streams_alone(tmp_path):
    model = _mlp(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=None)
    fresh = _mlp(1)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    load_checkpoint(tmp_path, model=fresh, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    model = _tiny_llama(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _lm_step(model, opt)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"step": 1})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({"lm_head.weight", "model.embed_tokens.weight"} & keys) == 1

    model2 = _tiny_llama(1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    assert not torch.equal(model2.lm_head.weight, model.lm_head.weight)
    load_checkpoint(path, model=model2, optimizer=opt2)
    _assert_same_state(_snapshot(model2), _snapshot(model))
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    _assert_same_optimizer(opt, opt2)


def _lora(base: nn.Module, **kw) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **kw))


def test_peft_lora_saves_adapter_only_and_round_trips(tmp_path):
    model = _lora(_tiny_llama(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _lm_step(model, opt)
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_B and all(p.abs().sum() > 0 for p in lora_B)  # trained, not at the zero init
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, trainer_state={"step": 1})
    assert not (path / "model.safetensors").exists()
    with safe_open(str(path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert (path / "adapter" / "adapter_config.json").is_file()

    model2 = _lora(_tiny_llama(0))  # the same base model, with adapters far from the saved ones
    with torch.no_grad():
        for n, p in model2.named_parameters():
            if "lora_" in n:
                p.normal_()
    opt2 = torch.optim.Adam([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(path, model=model2, optimizer=opt2)
    _assert_same_state(_snapshot(model2), _snapshot(model))
    _assert_same_optimizer(opt, opt2)

    with pytest.raises(ValueError, match="not a peft.PeftModel"):
        load_checkpoint(path, model=_tiny_llama(0))


def test_peft_refuses_trainable_weights_it_would_not_save(tmp_path):
    model = _lora(_tiny_llama(0))
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="modules_to_save"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=None)
    assert latest_checkpoint(tmp_path) is None


def test_extra_modules_round_trip_and_missing_one_is_named(tmp_path):
    model, head = _mlp(0), nn.Linear(8, 1)
    save_checkpoint(tmp_path, 2, model=model, optimizer=None, extra_modules={"value_head": head})
    head2 = nn.Linear(8, 1)
    load_checkpoint(tmp_path, model=_mlp(1), extra_modules={"value_head": head2})
    _assert_same_state(_snapshot(head2), _snapshot(head))
    with pytest.raises(KeyError, match="critic.*value_head"):
        load_checkpoint(tmp_path, model=_mlp(1), extra_modules={"critic": nn.Linear(8, 1)})


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No checkpoint at {re.escape(str(tmp_path))}.*meta.json"):
        load_checkpoint(tmp_path, model=_mlp(0))
    model = _mlp(0)
    with pytest.raises(TypeError, match=r"trainer_state\['data'\]\['path'\]"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=None, trainer_state={"data": {"path": Path("/x")}})
    with pytest.raises(ValueError, match="trainer_state\\['step'\\]=2 but step=1"):
        save_checkpoint(tmp_path, 1, model=model, optimizer=None, trainer_state={"step": 2})
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, model=model, optimizer=None)
    with pytest.raises(FileNotFoundError, match="without optimizer state"):
        load_checkpoint(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------

def _steps_on_disk(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def test_keep_last_prunes_oldest(tmp_path):
    model = _mlp(0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model=model, optimizer=None, keep_last=2)
    assert _steps_on_disk(tmp_path) == ["step-000020", "step-000030"]
    assert latest_checkpoint(tmp_path).name == "step-000030"
    save_checkpoint(tmp_path, 40, model=model, optimizer=None, keep_last=1)
    assert _steps_on_disk(tmp_path) == ["step-000040"]


def test_keep_all_and_stale_future_checkpoints(tmp_path):
    model = _mlp(0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model=model, optimizer=None, keep_last=None)
    assert _steps_on_disk(tmp_path) == ["step-000010", "step-000020", "step-000030"]
    # Resumed from step 10 and saving at 15: 20 and 30 belong to the abandoned continuation.
    save_checkpoint(tmp_path, 15, model=model, optimizer=None, keep_last=2)
    assert _steps_on_disk(tmp_path) == ["step-000010", "step-000015"]
    assert latest_checkpoint(tmp_path).name == "step-000015"


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------

def _partial_then_fail(*args, **kwargs):
    target = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, Path))), None)
    if target is not None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(b"\x00half a file")
    raise OSError("simulated: disk full")


def _fail(*args, **kwargs):
    raise OSError("simulated: crash")


def _fail_on_meta(path, text):
    if Path(path).name == "meta.json":
        raise OSError("simulated: crash before meta.json")
    return _real_write_text(path, text)


_real_write_text = ckpt_mod.write_text


@pytest.mark.parametrize("stage", ["weights", "extra", "optimizer", "meta", "fsync", "rename", "pointer"])
def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, stage):
    model = _mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    head = nn.Linear(2, 1)
    _train_steps(model, opt, 1)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, extra_modules={"head": head},
                    trainer_state={"step": 1})
    at_step_1 = _snapshot(model)
    _train_steps(model, opt, 1)

    if stage == "weights":
        monkeypatch.setattr(ckpt_mod, "save_model", _partial_then_fail)
    elif stage == "extra":
        real = ckpt_mod.save_model
        monkeypatch.setattr(ckpt_mod, "save_model",
                            lambda m, f: _partial_then_fail(f) if m is head else real(m, f))
    elif stage == "optimizer":
        monkeypatch.setattr(torch, "save", _partial_then_fail)
    elif stage == "meta":
        monkeypatch.setattr(ckpt_mod, "write_text", _fail_on_meta)
    elif stage == "fsync":
        monkeypatch.setattr(ckpt_mod, "fsync_tree", _fail)
    elif stage == "rename":
        monkeypatch.setattr(ckpt_mod, "move_into_place", _fail)
    elif stage == "pointer":  # the new directory is in place, `latest` not yet updated
        monkeypatch.setattr(ckpt_mod, "write_pointer", _fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, extra_modules={"head": head},
                        trainer_state={"step": 2})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path).name == "step-000001"
    fresh = _mlp(5)
    state = load_checkpoint(tmp_path, model=fresh, optimizer=torch.optim.Adam(fresh.parameters()),
                            extra_modules={"head": nn.Linear(2, 1)})
    assert state == {"step": 1}
    _assert_same_state(_snapshot(fresh), at_step_1)
    visible = _steps_on_disk(tmp_path)
    assert visible == (["step-000001", "step-000002"] if stage == "pointer" else ["step-000001"])

    # Resume: the next save (of the same step 2) succeeds and cleans up what the failure left.
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, extra_modules={"head": head}, trainer_state={"step": 2})
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert load_checkpoint(tmp_path, model=_mlp(5)) == {"step": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_resaving_a_step_swaps_it_atomically(tmp_path, monkeypatch):
    model = _mlp(0)
    save_checkpoint(tmp_path, 4, model=model, optimizer=None, trainer_state={"step": 4, "v": "old"})
    # Crash between moving the old copy aside and moving the new one in: the old copy is found.
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith("step-000004") and str(dst).endswith(".replaced"):
            real_replace(src, dst)
            raise OSError("simulated: crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 4, model=model, optimizer=None, trainer_state={"step": 4, "v": "new"})
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="missing or incomplete"):
        found = latest_checkpoint(tmp_path)
    assert found.name == "step-000004.replaced"
    assert load_checkpoint(found, model=_mlp(1)) == {"step": 4, "v": "old"}
    save_checkpoint(tmp_path, 4, model=model, optimizer=None, trainer_state={"step": 4, "v": "new"})
    assert load_checkpoint(tmp_path, model=_mlp(1)) == {"step": 4, "v": "new"}
    assert _steps_on_disk(tmp_path) == ["step-000004"]


_KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from seqpg.rundir.checkpoint import save_checkpoint
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    for step in range(1, 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_checkpoint(sys.argv[1], step, model=model, optimizer=None, trainer_state={"step": step}, keep_last=2)
        print(step, flush=True)
""")


def test_sigkill_at_any_moment_leaves_a_complete_latest_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    run = tmp_path / "run"
    rng = random.Random(0)
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(2):  # wait until saving is under way, then kill at a random moment
                assert proc.stdout.readline(), "the saver exited early"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        found = latest_checkpoint(run)
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        state = load_checkpoint(found, model=model)
        assert found.name == f"step-{state['step']:06d}"
        assert all(torch.all(p == float(state["step"])) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------

def _wait_for(flag: StopFlag) -> None:
    deadline = time.monotonic() + 2.0
    while not flag.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_stop_flag_finishes_the_step_saves_and_restores_the_handler(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    model = _mlp(0)
    steps_done = []
    with StopFlag(announce=False) as stop:
        assert signal.getsignal(signal.SIGINT) != previous
        for step in range(1, 100):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(stop)
            steps_done.append(step)  # the step in flight completes
            if stop.is_set():
                save_checkpoint(tmp_path, step, model=model, optimizer=None, trainer_state={"step": step})
                break
    assert steps_done == [1, 2, 3]
    assert stop.received == signal.SIGINT
    assert load_checkpoint(tmp_path, model=_mlp(1)) == {"step": 3}
    assert signal.getsignal(signal.SIGINT) == previous


def test_second_sigint_aborts(capsys):
    with pytest.raises(KeyboardInterrupt):
        with StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(stop)
            assert stop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2.0)
    assert "finishing the current step" in capsys.readouterr().err
