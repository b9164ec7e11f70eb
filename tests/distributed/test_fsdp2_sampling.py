"""Sampling from an FSDP2-sharded policy when processes decode different numbers of tokens.

Every forward pass of a sharded module gathers its parameters, a collective; two processes
whose decode loops run 2 and 9 steps would wait for each other forever.  ``Parallel.full_params``
gathers the parameters once for the whole of generation, so no forward pass inside makes a
collective call.  Here rank 0 decodes 2 tokens and rank 1 nine, three times, then both train
a step; the tokens must be those of the plain (unsharded) model with the same generator.
"""

from __future__ import annotations

import os
import time

import torch
import torch.multiprocessing as mp

from dist_helpers import free_port

PROMPTS = ["cat", "sunny sky"]


def _generate(model, tokenizer, rank: int, round_: int):
    from seqpg.batch import Prompt
    from seqpg.rollout.sampling import generate

    gen = torch.Generator().manual_seed(100 * rank + round_)
    return generate(model, tokenizer, [Prompt(PROMPTS[rank], str(rank))], n=3, chat_template=False,
                    max_new_tokens=2 if rank == 0 else 9, generator=gen)


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from seqpg.training.distributed import DistContext, Parallel
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer

    dist = DistContext.from_env("cpu", timeout_s=60)
    tok = build_tiny_tokenizer()
    plain = build_tiny_model(len(tok), seed=0)
    parallel = Parallel.wrap(build_tiny_model(len(tok), seed=0).train(), {}, dist, "fsdp2")
    for round_ in range(3):
        with parallel.full_params() as model:
            sharded_ids = _generate(model, tok, rank, round_).completion_ids_BC
        plain_ids = _generate(plain, tok, rank, round_).completion_ids_BC
        assert torch.equal(sharded_ids, plain_ids), (rank, round_)
    ids = torch.tensor([[5, 6, 7, 8]])
    parallel.policy(input_ids=ids).logits.sum().backward()  # the sharded training path still works after
    grads_finite = all(bool(p.grad.full_tensor().isfinite().all()) for p in parallel.policy.parameters())
    results[rank] = (sharded_ids.shape[1], grads_finite)
    dist.close()


def test_fsdp2_generation_with_different_decode_lengths_per_process():
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_worker, args=(free_port(), results), nprocs=2, join=False, start_method="spawn")
        deadline = time.monotonic() + 90  # the collectives themselves time out after 60 s
        try:
            while not ctx.join(timeout=1):
                assert time.monotonic() < deadline, "the processes hang"
        finally:
            for p in ctx.processes:
                p.kill()
        assert dict(results) == {0: (2, True), 1: (9, True)}
