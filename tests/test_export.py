"""`seqpg export`: trained tiny runs written as Hugging Face directories and GGUF files, read back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import seqpg.apps.export as export_mod
from seqpg.apps.cli import main
from seqpg.config import load_config
from seqpg.apps.export import ExportError, export, rope_permute, write_gguf
from seqpg.model.loading import SMOLLM2_CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer, \
    resolve_model
from seqpg.apps.session import eval_target, load_policy_for, resolve_target_config
from seqpg.training.trainer import train

IDS = torch.tensor([[1, 5, 40, 41, 42, 4, 60, 2, 70, 71, 72, 73]])
CHAT = "<|im_start|>user\nhello, world!\t 12<|im_end|>\n<|im_start|>assistant\n"


def _train_run(root, *extra: str):
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in
                               ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea", "cup", "map", "owl", "fox"]))
    cfg = load_config(None, ["model.name=tiny", "task.source=jsonl", f"task.name={prompts}", "task.eval_size=4",
                             "task.train_size=8", "sampling.max_new_tokens=6", "sampling.prompts_per_step=2",
                             "sampling.samples_per_prompt=4", "optim.lr=3e-2", "tensorboard=false", "threads=1",
                             "rewards=[{kind: length, params: {unit: chars, target: 3}}]", "steps=2",
                             f"run_dir={root / 'run'}", *extra])
    return train(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _train_run(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train_run(tmp_path_factory.mktemp("lora"), "model.lora_r=4", "model.lora_target_modules=[q_proj, v_proj]")


def _seqpg_logits(run):
    model, _, _ = load_policy_for(str(run), resolve_target_config(str(run)), device=torch.device("cpu"))
    with torch.no_grad():
        return model(IDS).logits


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def _base_logits():
    return _logits(build_tiny_model(101, seed=0))


# --- Hugging Face directory ------------------------------------------------------------------

def test_a_sharded_fsdp2_checkpoint_is_reassembled_into_a_whole_model(tmp_path):
    """parallel=fsdp2 writes each process's shards (torch.distributed.checkpoint); export reassembles them."""
    from seqpg.rundir.checkpoint import latest_checkpoint
    from seqpg.rundir.checkpoint_files import META_FILE

    run = _train_run(tmp_path, "parallel=fsdp2")
    assert json.loads((latest_checkpoint(run) / META_FILE).read_text())["weights"] == "dcp"
    out = export(run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(model), _seqpg_logits(run))
    assert not torch.allclose(_logits(model), _base_logits())  # trained, not the base model



def test_hf_export_of_a_full_run_loads_with_from_pretrained_and_equal_logits(full_run, tmp_path):
    out = export(full_run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left beside it
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = _seqpg_logits(full_run)
    assert torch.equal(_logits(model), ours)
    assert (ours - _base_logits()).abs().max() > 1e-3  # the run trained: exporting the base model would fail
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE and tok(CHAT).input_ids == build_tiny_tokenizer()(CHAT).input_ids


def test_a_full_checkpoint_itself_loads_with_from_pretrained(full_run):
    ckpt = sorted((full_run / "checkpoints").glob("step-*"))[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.equal(_logits(model), _seqpg_logits(full_run))
    assert transformers.AutoTokenizer.from_pretrained(ckpt / "tokenizer").chat_template == SMOLLM2_CHAT_TEMPLATE


def test_hf_export_of_a_checkpoint_directory_and_in_f16(full_run, tmp_path):
    ckpt = sorted((full_run / "checkpoints").glob("step-*"))[-1]
    out = export(ckpt, tmp_path / "hf16", dtype="f16")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float16
    torch.testing.assert_close(_logits(model.float()), _seqpg_logits(full_run), atol=2e-2, rtol=0)


def test_lora_run_exports_merged_and_as_a_peft_adapter(lora_run, tmp_path):
    import peft
    from safetensors.torch import load_file

    ours = _seqpg_logits(lora_run)
    assert (ours - _base_logits()).abs().max() > 1e-4  # the adapters moved

    merged = export(lora_run, tmp_path / "merged")
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))
    torch.testing.assert_close(_logits(transformers.AutoModelForCausalLM.from_pretrained(merged)), ours,
                               atol=1e-5, rtol=0)

    adapter = export(lora_run, tmp_path / "adapter", lora="adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert not (adapter / "config.json").exists()
    loaded = peft.PeftModel.from_pretrained(build_tiny_model(101, seed=0), adapter)
    assert torch.equal(_logits(loaded), ours)


def test_eval_and_explain_accept_an_exported_directory(full_run, tmp_path):
    from seqpg.apps.explain import explain

    out = export(full_run, tmp_path / "hf")
    on_run, on_export = eval_target(str(full_run)), eval_target(str(out))
    assert on_export.step == on_run.step == 2
    strip = lambda r: {k: v for k, v in r.as_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(on_export.result) == strip(on_run.result)
    a, b = explain(str(full_run), "cat", "abc"), explain(str(out), "cat", "abc")
    assert torch.equal(a.contributions.logprob_BT, b.contributions.logprob_BT) and a.step == b.step


# --- GGUF file ------------------------------------------------------------------------------

def _through_seqpg_loader(gguf_path, cache):
    return load_model_and_tokenizer(resolve_model(gguf_path, cache_dir=cache))


def test_gguf_f32_round_trip_through_seqpg_loader_is_exact(full_run, tmp_path):
    assert main(["export", str(full_run), str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "f32"]) == 0
    model, tok = _through_seqpg_loader(tmp_path / "m.gguf", tmp_path / "cache")
    torch.testing.assert_close(_logits(model), _seqpg_logits(full_run), atol=1e-6, rtol=0)
    ref = build_tiny_tokenizer()
    assert tok(CHAT).input_ids == ref(CHAT).input_ids and tok.decode(ref(CHAT).input_ids) == CHAT
    assert tok.chat_template == SMOLLM2_CHAT_TEMPLATE and (tok.eos_token_id, tok.pad_token_id) == (2, 0)


def test_gguf_f16_round_trip_is_within_half_precision(lora_run, tmp_path):
    out = export(lora_run, tmp_path / "m.gguf", format="gguf")  # f16 by default, adapters merged
    model, _ = _through_seqpg_loader(out, tmp_path / "cache")
    ours = _seqpg_logits(lora_run)
    err = (_logits(model) - ours).abs().max()
    assert 0 < err < 2e-2


def test_rope_permutation_is_what_makes_the_gguf_round_trip_exact(tmp_path, monkeypatch):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=5)
    monkeypatch.setattr(export_mod, "rope_permute", lambda w, n_heads: w)
    write_gguf(model, tok, tmp_path / "unpermuted.gguf", dtype="f32")
    wrong, _ = _through_seqpg_loader(tmp_path / "unpermuted.gguf", tmp_path / "cache")
    assert (_logits(wrong) - _logits(model)).abs().max() > 1e-3


def test_rope_permute_interleaves_each_heads_halves():
    w = torch.arange(16.0).reshape(8, 2)  # 2 heads of dimension 4: rows 0..3 and 4..7
    rows = rope_permute(w, 2)[:, 0] / 2
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # (x_j, x_{j+d/2}) pairs become adjacent rows


@pytest.mark.parametrize("tied, kv_heads", [(True, 4), (False, 2)])
def test_gguf_tied_and_untied_embeddings_and_grouped_kv_heads(tmp_path, tied, kv_heads):
    import gguf

    tok = build_tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=104, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                      max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).eval()
    write_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) is not tied and "token_embd.weight" in names
    back, back_tok = _through_seqpg_loader(tmp_path / "m.gguf", tmp_path / "cache")
    assert back.config.tie_word_embeddings is tied and back.config.num_key_value_heads == kv_heads
    torch.testing.assert_close(_logits(back), _logits(model), atol=1e-6, rtol=0)
    assert back_tok.convert_ids_to_tokens(103) == "[PAD103]"  # embedding rows past the tokenizer


# --- errors --------------------------------------------------------------------------------

def test_bad_inputs_exit_2_with_one_line_messages(full_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    cases = [
        ([str(tmp_path / "nowhere"), str(tmp_path / "o")], "does not exist"),
        ([str(tmp_path / "empty"), str(tmp_path / "o")], "not a seqpg run or checkpoint"),
        ([str(full_run), str(tmp_path / "o"), "--lora", "adapter"], "full fine-tune"),
        ([str(full_run), str(tmp_path / "o"), "--format", "gguf"], ".gguf name"),
        ([str(full_run), str(tmp_path / "o.gguf"), "--format", "gguf", "--dtype", "bf16"], "f32 or f16"),
        ([str(full_run), str(tmp_path / "taken")], "--overwrite"),
    ]
    for argv, expected in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_gguf_refuses_other_architectures_and_biases(tmp_path):
    tok = build_tiny_tokenizer()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=101, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ExportError, match="architecture 'gpt2' is not supported"):
        write_gguf(gpt2, tok, tmp_path / "g.gguf")
    biased = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=101, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        attention_bias=True))
    with pytest.raises(ExportError, match="attention_bias=True"):
        write_gguf(biased, tok, tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())


def test_a_failed_export_leaves_nothing_and_overwrite_replaces(full_run, tmp_path, monkeypatch):
    out = export(full_run, tmp_path / "hf")
    (out / "marker").write_text("old")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export(full_run, out, overwrite=True)
    assert (out / "marker").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["hf"]
    monkeypatch.undo()
    export(full_run, out, overwrite=True)
    assert not (out / "marker").exists() and [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_gguf_round_trip_keeps_logits_and_byte_level_tokens(tmp_path):
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    write_gguf(model, tok, tmp_path / "smollm2.gguf", dtype="f32")
    back, back_tok = _through_seqpg_loader(tmp_path / "smollm2.gguf", tmp_path / "cache")
    text = tok.apply_chat_template([{"role": "user", "content": "Héllo, wörld! 12 + 30 = ?\n\ttabs"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    assert back_tok(text).input_ids == ids[0].tolist() and back_tok.decode(ids[0]) == tok.decode(ids[0])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


# --- OUT: never a run, never more than an earlier export ------------------------------------

def test_export_never_deletes_what_it_was_given(full_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    ckpt = next((run / "checkpoints").glob("step-*"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "holder").mkdir()
    shutil.copytree(full_run, tmp_path / "holder" / "inner")
    cases = [
        ([str(run), str(run), "--overwrite"], "is a run directory"),  # the reported command
        ([str(run), str(ckpt), "--overwrite"], "is a checkpoint"),
        ([str(run), str(run / "checkpoints"), "--overwrite"], "lies inside a run directory"),
        ([str(run), str(run / "export")], "lies inside a run directory"),
        ([str(run), str(tmp_path / "holder"), "--overwrite"], "contains a run directory"),
        ([str(run), str(tmp_path / "notes"), "--overwrite"], "is not an earlier seqpg export"),
        ([str(run), str(tmp_path / "notes" / "todo.txt"), "--overwrite"], "is not an earlier seqpg export"),
    ]
    (tmp_path / "notes" / "m.gguf").write_text("not gguf")
    cases.append(([str(run), str(tmp_path / "notes" / "m.gguf"), "--overwrite", "--format", "gguf"],
                  "is not a GGUF file"))
    for argv, expected in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and (run / "checkpoints").is_dir()
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), str(tmp_path / "empty"), "--overwrite"]) == 0  # an empty directory: allowed
    assert main(["export", str(run), str(tmp_path / "empty"), "--overwrite"]) == 0  # an earlier export: allowed
    assert export_mod.exported_step(tmp_path / "empty") == 2
    assert main(["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 0
    assert main(["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf", "--overwrite"]) == 0


def test_export_into_a_run_being_trained_names_the_holder(full_run, tmp_path, capsys):
    import os
    import shutil

    from seqpg.rundir.runlock import RunLock

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    with RunLock(run):
        assert main(["export", str(full_run), str(run / "export")]) == 2
    err = capsys.readouterr().err
    assert f"lies in a run being trained: {run} is in use by pid {os.getpid()}" in err and err.count("\n") == 1
    assert not (run / "export").exists()
