"""Sharded checkpoints under ``parallel=fsdp2``: each process writes its own shards, a checkpoint
resumes with another number of processes, and a process killed while saving leaves ``latest``
naming the previous complete checkpoint.

The runs: A2C (a policy, a separate critic, AdamW over both) with ``sampling.seed_per_prompt``
and a dense reward, so that one step with 1 or 2 processes gives the same parameters to float
tolerance (``test_same_update.py``).  The reference is a 2-process run of 2 steps; the resumes
continue its step-1 checkpoint with 1 process (2 -> 1), and a 1-process step-1 checkpoint with
2 processes (1 -> 2).  A lost or misplaced Adam moment moves the second step by O(lr) = 3e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dist_helpers import HERE, free_port, torchrun
from seqpg.rundir.checkpoint import full_model_state, latest_checkpoint, load_checkpoint
from seqpg.rundir.checkpoint_files import CheckpointDamaged
from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train
from test_same_update import DENSE, _assert_same_metrics

CASE = ["sampling.seed_per_prompt=true", DENSE, "algo.name=a2c", "parallel=fsdp2"]


def _ckpt(run, step: int):
    return run / "checkpoints" / f"step-{step:06d}"


@pytest.fixture(scope="module")
def runs(overrides, dist_tmp):
    """two: 2 processes, 2 steps; one_then_two: 1 process for step 1, then 2 processes;
    two_then_one: the step-1 checkpoint of ``two``, continued by 1 process."""
    train(load_config(None, overrides(*CASE, "steps=1", run="one_then_two")), progress=False)
    jobs = [{"overrides": overrides(*CASE, "steps=2", "save_every=1", run="two")},
            {"overrides": overrides(*CASE, "steps=2", run="one_then_two"), "resume": True}]
    (dist_tmp / "jobs-ckpt.json").write_text(json.dumps(jobs))
    launch = torchrun(2, str(HERE / "run_configs.py"), str(dist_tmp / "jobs-ckpt.json"),
                      log_dir=dist_tmp / "logs-ckpt")
    assert launch.returncode == 0, launch.output[-4000:]
    errors = sorted(p.read_text() for p in dist_tmp.glob("*/error-rank*.json"))
    assert not errors, errors
    shutil.copytree(dist_tmp / "two", dist_tmp / "two_then_one")
    shutil.rmtree(_ckpt(dist_tmp / "two_then_one", 2))
    (dist_tmp / "two_then_one" / "checkpoints" / "latest").write_text("step-000001\n")
    train(load_config(None, overrides(*CASE, "steps=2", run="two_then_one")), resume=True, progress=False)
    return dist_tmp


def test_every_process_writes_only_its_own_shards(runs):
    ckpt = _ckpt(runs / "two", 1)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["weights"], meta["world_size"], meta["extra_modules"]) == ("dcp", 2, ["critic"])
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == files  # every file the checkpoint holds has its sha256 recorded
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank-00000.pt",
            "rng/rank-00001.pt", "scheduler.pt", "trainer_state.json"} <= set(files)
    # each weight matrix of policy and critic is stored as two halves, one in each process's file
    md = FileSystemReader(str(ckpt / "dcp")).read_metadata()
    where = {}
    for index, info in md.storage_data.items():
        where.setdefault(index.fqn, set()).add(info.relative_path)
    matrices = [k for k, v in md.state_dict_metadata.items() if k.startswith("model.") and len(v.size) == 2]
    assert len(matrices) > 20
    for key in matrices:
        assert len(md.state_dict_metadata[key].chunks) == 2, key
        assert where[key] == {"__0_0.distcp", "__1_0.distcp"}, key


def _optimizer_state(ckpt, out) -> dict[str, torch.Tensor]:
    """The Adam moments and step counts of a sharded checkpoint, whole, by parameter name."""
    dcp_to_torch_save(str(ckpt / "dcp"), str(out))
    state = torch.load(out, weights_only=False)["optim"]["state"]
    return {f"{name}/{k}": v for name, entry in state.items() for k, v in entry.items()}


@pytest.mark.parametrize("resumed", ["two_then_one", "one_then_two"])
def test_a_sharded_checkpoint_resumes_with_another_number_of_processes(resumed, runs, tmp_path):
    a, b = _ckpt(runs / "two", 2), _ckpt(runs / resumed, 2)
    for module in ("policy", "critic"):
        wa, wb = full_model_state(a, module), full_model_state(b, module)
        assert wa.keys() == wb.keys()
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst < 1e-3, (module, worst)
        first = full_model_state(_ckpt(runs / "two", 1), module)
        assert max(float((wa[k] - first[k]).abs().max()) for k in wa) > 1e-2  # step 2 moved the weights
    oa, ob = _optimizer_state(a, tmp_path / "a.pt"), _optimizer_state(b, tmp_path / "b.pt")
    assert oa.keys() == ob.keys() and len(oa) == 3 * 43  # exp_avg, exp_avg_sq, step of every parameter
    for k in oa:
        assert torch.allclose(oa[k], ob[k], rtol=1e-3, atol=1e-7), (k, float((oa[k] - ob[k]).abs().max()))
    _assert_same_metrics(read_jsonl(runs / "two" / "metrics.jsonl"), read_jsonl(runs / resumed / "metrics.jsonl"))


def test_a_changed_file_is_refused_on_load(runs, tmp_path):
    ckpt = shutil.copytree(_ckpt(runs / "two", 2), tmp_path / "step-000002")
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer

    with pytest.raises(CheckpointDamaged, match=r"dcp/__1_0.distcp: sha256 differs"):
        load_checkpoint(ckpt, model=build_tiny_model(len(build_tiny_tokenizer())), restore_rng=False)


# ---------------------------------------------------------------------------------------------
# A process killed while saving
# ---------------------------------------------------------------------------------------------

KILLED = 17  # the exit status of the process killed on purpose


def _worker(rank: int, port: int, run: str, moment: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import seqpg.rundir.checkpoint_dcp as cd
    from seqpg.training.distributed import DistContext, Parallel
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
    from seqpg.rundir.parallel_checkpoint import save_parallel_checkpoint

    dist = DistContext.from_env("cpu", timeout_s=30)
    parallel = Parallel.wrap(build_tiny_model(len(build_tiny_tokenizer()), seed=0).train(), {}, dist, "fsdp2")
    optimizer = torch.optim.AdamW(parallel.policy.parameters(), lr=1e-2)

    def step_and_save(step: int) -> None:
        parallel.policy(input_ids=torch.tensor([[5, 6, 7, 8 + rank]])).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_parallel_checkpoint(parallel, run, step, optimizer, trainer_state={"step": step}, scheduler=None,
                                 keep_last=2, tokenizer=None)

    step_and_save(1)
    full = {k: v.full_tensor() for k, v in parallel.policy.state_dict().items()}  # collective
    if rank == 0:
        torch.save(full, f"{run}/expected-step-1.pt")
    if moment == "shards":
        if rank == 1:  # a failure (not a kill) on one process: every process raises, nothing is left
            cd._save_synced = _raise_disk_full
        try:
            step_and_save(2)
        except Exception as e:  # noqa: BLE001 -- recorded for the test
            results[f"error-{rank}"] = type(e).__name__
        dist.barrier()
        if rank == 1:  # the kill: once its shard file is written (DCP then fsyncs it), before anything else
            os.fsync = lambda fd: os._exit(KILLED)
    elif rank == 0:  # the kill: the temporary directory is complete, meta.json included, not yet renamed
        cd.move_into_place = lambda tmp, final: os._exit(KILLED)
    step_and_save(2)
    results[f"survived-{rank}"] = True


def _raise_disk_full(obj, path):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("moment", ["shards", "rename"])
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(moment, tmp_path):
    from seqpg.rundir.checkpoint_dcp import save_sharded_checkpoint
    from seqpg.training.distributed import DistContext
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_worker, args=(free_port(), str(run), moment, results), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 90
        with pytest.raises(ProcessException):  # join then stops the other process, as torchrun does
            while not ctx.join(timeout=1):
                assert time.monotonic() < deadline, "the processes hang"
        results = dict(results)
    killed = 1 if moment == "shards" else 0
    assert ctx.processes[killed].exitcode == KILLED and not any(k.startswith("survived") for k in results), results
    if moment == "shards":
        assert results == {"error-0": "ProcessFailed", "error-1": "OSError"}
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step-000001\n"
    assert latest_checkpoint(run) == root / "step-000001"
    left = [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # of the killed save only
    if moment == "shards":  # rank 0, seeing rank 1 gone, may have begun to remove it before it was stopped
        assert len(left) <= 1 and not any((p / "meta.json").exists() for p in left), left
    else:
        assert len(left) == 1 and (left[0] / "meta.json").is_file()
    expected = torch.load(run / "expected-step-1.pt")
    got = full_model_state(run)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    model = build_tiny_model(len(build_tiny_tokenizer()), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_checkpoint(run, model=model, optimizer=optimizer)["step"] == 1  # in one process, checksums verified
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    # the next save (here by one process) clears what the killed one left
    save_sharded_checkpoint(run, 2, modules={"policy": model}, optimizer=optimizer, dist=DistContext())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001", "step-000002"]
