"""The sampling phase's bandwidth floor: exact byte counts on tiny configurations, worked by hand."""

from __future__ import annotations

import pytest
import torch
import transformers

from seqpg.apps.bench.compare import headline, summarise
from seqpg.apps.bench.floor import (DecodeShape, StorageBytes, decode_step_bytes, generation_bytes, memory_bandwidth,
                                    sampler_storage)
from seqpg.apps.bench.report import markdown

FP32 = StorageBytes(matrix=4, vector=4, key=4, value=4)
# the tiny model of conftest: 2 layers, d 32, 4 heads of 8 (no grouping), MLP 64, vocab 101, untied head
#   per layer: q, k, v, o 4 x 32 x 32 = 4096; gate, up 2 x 64 x 32 = 4096; down 32 x 64 = 2048 -> 10240
#   head 101 x 32 = 3232; vectors: 2 norms x 32 per layer + the final norm's 32 = 160
TINY = DecodeShape(layer_matrix_params=20480, head_params=3232, vector_params=160, n_layers=2, kv_heads=4,
                   head_dim=8)


def test_decode_shape_of_the_tiny_model(tiny_model_and_tokenizer):
    assert DecodeShape.of(tiny_model_and_tokenizer[0]) == TINY


def test_decode_shape_counts_grouped_heads_and_a_tied_head_whole():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # q, o 16 x 16 = 256 each; k, v (2 heads x 4) x 16 = 128 each; gate, up, down 32 x 16 = 512 each -> 2304
    # head 50 x 16 = 800 (the embedding, still read whole per step); vectors 2 x 16 + 16 = 48
    assert DecodeShape.of(model) == DecodeShape(layer_matrix_params=2304, head_params=800, vector_params=48,
                                                n_layers=1, kv_heads=2, head_dim=4)


def test_decode_step_bytes_fp32():
    # weights 4 x (20480 + 3232) + 4 x 160 = 95488; per cached position (4 + 4) x 2 layers x 4 heads x 8 = 512
    assert decode_step_bytes(TINY, FP32, []) == 95488
    assert decode_step_bytes(TINY, FP32, [3, 5]) == 95488 + 512 * 8


def test_decode_step_bytes_bf16_products_fp32_keys():
    # what seqpg's sampler reads under bf16 autocast: matrices bf16, norms fp32, keys fp32, values bf16
    sizes = StorageBytes(matrix=2, vector=4, key=4, value=2)
    # weights 2 x 23712 + 4 x 160 = 48064; per position (4 + 2) x 64 = 384
    assert decode_step_bytes(TINY, sizes, [7]) == 48064 + 384 * 7


def test_generation_bytes_counts_active_rows_at_their_lengths():
    # prompts 3 and 2 tokens, completions 2 and 1: step 0 both rows, KV 3 and 2; step 1 row 0 only, KV 4
    assert generation_bytes(TINY, FP32, [3, 2], [2, 1]) == 2 * 95488 + 512 * (3 + 2 + 4)
    assert generation_bytes(TINY, FP32, [3, 2], [0, 0]) == 0
    # a longer prompt costs its KV at every step it is decoded, nothing more
    assert (generation_bytes(TINY, FP32, [13, 2], [2, 1]) - generation_bytes(TINY, FP32, [3, 2], [2, 1])
            == 512 * 10 * 2)


def test_generation_bytes_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompt lengths for 1 completions"):
        generation_bytes(TINY, FP32, [3, 2], [2])
    with pytest.raises(ValueError, match="KV lengths must be >= 0"):
        decode_step_bytes(TINY, FP32, [-1])


def test_sampler_storage_reads_the_dtypes_the_sampler_uses(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    assert sampler_storage(model, None) == FP32
    # bf16 autocast: products in bf16; rope promotes the keys back to fp32, the values stay bf16
    assert sampler_storage(model, torch.bfloat16) == StorageBytes(matrix=2, vector=4, key=4, value=2)


def test_memory_bandwidth_reports_both_kernels():
    bw = memory_bandwidth(mib=1, repeats=2)
    assert bw["mib"] == 1 and bw["read_bytes_per_s"] > 0 and bw["copy_bytes_per_s"] > 0


def _record(sampling_s: float, sampling_bytes: float) -> dict:
    phases = {"sampling": sampling_s, "scoring": 0.01, "logprob_forward": 0.2, "backward": 0.3, "optimizer": 0.1,
              "step": sampling_s + 0.61}
    return {**phases, "cpu": dict(phases), "completion_tokens": 100, "train_flops": 3e9, "reward": 0.5,
            "threads": 1, "warmup": False, "sampling_bytes": sampling_bytes}


def test_summary_and_report_hold_sampling_against_its_floor():
    raw = {"steps": {"trl": [_record(s, 2e9) for s in (1.0, 2.0, 4.0)],
                     "seqpg": [_record(s, 1e9) for s in (0.5, 1.0, 2.0)]},
           "peak_rss_mib": {"trl": 2000.0, "seqpg": 1000.0}, "initial_eval": {"trl": None, "seqpg": None}}
    peak = {"flops_per_s": 1e10, "flops_per_cpu_s": 1e10, "size": 1024}
    bandwidth = {"read_bytes_per_s": 1e10, "copy_bytes_per_s": 2e10, "mib": 256}
    s = summarise(raw, peak, bandwidth)
    trl, mine = s["libraries"]["trl"], s["libraries"]["seqpg"]
    # seqpg: 1e9 bytes at 1e10 B/s = 0.1 s a step, against 0.5, 1, 2 s of sampling: shares 20%, 10%, 5%
    assert mine["sampling_floor_s"] == pytest.approx(0.1) and mine["sampling_floor_share"] == pytest.approx(0.1)
    assert trl["sampling_floor_s"] == pytest.approx(0.2) and trl["sampling_floor_share"] == pytest.approx(0.1)
    assert mine["training_floor_s"] == pytest.approx(0.3)  # 3e9 FLOPs at 1e10 FLOP/s
    h = headline([{"dtype": "fp32", "threads": 1, "summary": s}])
    assert h["sampling_floor_share_fp32"] == pytest.approx(0.1)
    report = {"machine": {"cpu_model": "x", "logical_cpus": 2, "torch": "t", "transformers": "t", "trl": "t"},
              "setup": {"config": "examples/demo.yaml", "overrides": [], "warmup": 0, "steps": 3}, "lr": 2e-5,
              "sampling": {}, "runs": [{"dtype": "fp32", "threads": 1, "summary": s}], **h}
    text = markdown(report)
    assert "; memory bandwidth 10.0 GB/s read, 20.0 GB/s copy" in text
    assert "| sampling | bytes its decode steps read (TRL 2.00 GB, seqpg 1.00 GB per step) / 10.0 GB/s | 0.200 | " \
           "10.0% | 0.100 | 10.0% |" in text
    assert "| model FLOPs / 10 GFLOP/s | 0.300 | 50.0% | 0.300 | 50.0% |" in text  # 0.3 s of 0.6 s training
    assert "Its sampling runs at 10.0% of the speed of its memory-bandwidth floor." in text


def test_a_report_without_the_bandwidth_has_no_floor_table():
    raw = {"steps": {name: [_record(1.0, 1e9)] for name in ("trl", "seqpg")},
           "peak_rss_mib": {"trl": 1.0, "seqpg": 1.0}, "initial_eval": {}}
    s = summarise(raw, {"flops_per_s": 1e10, "flops_per_cpu_s": 1e10, "size": 1024})
    assert "sampling_floor_s" not in s["libraries"]["seqpg"] and "memory_bandwidth" not in s
    report = {"machine": {"cpu_model": "x", "logical_cpus": 2, "torch": "t", "transformers": "t", "trl": "t"},
              "setup": {"config": "c", "overrides": [], "warmup": 0, "steps": 1}, "lr": 1.0, "sampling": {},
              "runs": [{"dtype": "fp32", "threads": 1, "summary": s}]}
    assert "its floor" not in markdown(report)
