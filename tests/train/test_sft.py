"""`seqpg sft` (supervised fine-tuning as the update with advantage 1) and `seqpg train --init`, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqpg.apps.cli import main
from seqpg.config import ModelConfig, load_config
from seqpg.model.loading import build_tiny_tokenizer
from seqpg.sft.demos import RenderSettings, conversation, demos_batch, render_demo
from seqpg.sft.trainer import sft
from seqpg.rollout.tools import load_tools
from seqpg.training.build import build_policy
from seqpg.rundir.runfiles import read_jsonl

HERE = Path(__file__).parent
WORDS = ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea", "cup", "map", "owl", "fox"]

TOOL_ROW = {"messages": [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
    {"role": "tool", "name": "add", "content": "5"},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "Yes: <answer>5</answer>"}]}
TOOL_TURNS = ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>',
              "Yes: <answer>5</answer><|im_end|>"]


def action_runs(tok, demo) -> list[str]:
    """The decoded maximal runs of action tokens."""
    runs, cur = [], []
    for i, a in zip(demo.ids + [None], demo.action + [False]):
        if a:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


@pytest.mark.parametrize("tools, system", [((), None), (("seqpg_test_envs:add",), "Be brief.")])
def test_the_trained_tokens_are_exactly_the_assistant_turns(tools, system):
    tok = build_tiny_tokenizer()
    s = RenderSettings(system_prompt=system, tools=tuple(load_tools(list(tools)).values()))
    demo = render_demo(tok, conversation(TOOL_ROW, 1, "f line 1"), s, "f line 1")
    assert action_runs(tok, demo) == TOOL_TURNS
    assert tok.decode(demo.ids) == demo.text  # one tokenisation of the one render
    context = tok.decode([i for i, a in zip(demo.ids, demo.action) if not a])
    assert "<|im_start|>tool\n5<|im_end|>" in context and "Sure?" in context and "<answer>" not in context
    if tools:  # described to the model as an episode describes them, in the system message
        assert context.startswith("<|im_start|>system\nBe brief.\n\nYou may call these tools")
    batch = demos_batch([demo], tok.pad_token_id)  # holes where the tool and user turns sit
    m = batch.completion_mask_BC[0].tolist()
    assert m[0] and m[-1] and not all(m)
    assert tok.decode(batch.prompt_ids_BP[0]).endswith("<|im_start|>assistant\n")


def test_prompt_completion_rows_train_the_completion_only():
    tok = build_tiny_tokenizer()
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"},
                      {"role": "user", "content": "again"}], "completion": "new"}
    demo = render_demo(tok, conversation(row, 1, "w"), RenderSettings(), "w")
    assert action_runs(tok, demo) == ["new<|im_end|>"]
    plain = render_demo(tok, conversation({"prompt": "ab", "completion": "cd"}, 1, "w"),
                        RenderSettings(chat_template=False), "w")
    assert plain.text == "abcd<|im_end|>" and action_runs(tok, plain) == ["cd<|im_end|>"]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def word_rows(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w.upper() + "!"}]}
            for w in WORDS[:n]]


@pytest.fixture
def sft_overrides(tmp_path):
    def make(*extra: str, run: str = "sft", rows: list | None = None) -> list[str]:
        data = write_rows(tmp_path / "demos.jsonl", rows if rows is not None else word_rows())
        return ["model.name=tiny", f"sft.data={data}", "sft.eval_fraction=0", "sft.batch_size=4", "sft.epochs=1",
                "optim.lr=1e-2", "optim.grad_noise=false", "tensorboard=false", "threads=1",
                f"run_dir={tmp_path / run}", *extra]
    return make


def test_the_loss_is_the_mean_nll_of_the_assistant_tokens_computed_independently(sft_overrides):
    rows = word_rows(4) + [TOOL_ROW]
    cfg = load_config(None, sft_overrides("sft.batch_size=5", "optim.lr=1e-9", rows=rows))
    result = sft(cfg, progress=False)
    logged = read_jsonl(result.run_dir / "metrics.jsonl")[0]

    model, tok = build_policy(ModelConfig(name="tiny"), 0, torch.device("cpu"))  # what the run started from
    nll, n = 0.0, 0
    for r in rows:
        msgs = [{**m, "content": m["content"] or TOOL_TURNS[0].removesuffix("<|im_end|>")} for m in r["messages"]]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], dim=-1)
        opener = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        for m in msgs:  # each assistant turn's tokens, found after its opener
            if m["role"] != "assistant":
                continue
            turn = tok(m["content"] + "<|im_end|>", add_special_tokens=False).input_ids
            at = next(i for i in range(len(ids)) if ids[i - len(opener):i] == opener and ids[i:i + len(turn)] == turn)
            nll -= sum(float(lp[t - 1, ids[t]]) for t in range(at, at + len(turn)))
            n += len(turn)
    assert logged["tokens"] == n
    assert logged["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_the_loss_falls_on_a_memorisation_set(sft_overrides):
    result = sft(load_config(None, sft_overrides("sft.epochs=15")), progress=False)
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 30
    assert rows[-1]["loss"] < 0.25 * rows[0]["loss"]
    assert rows[-1]["token_accuracy"] > rows[0]["token_accuracy"] + 0.5
    assert (result.run_dir / "plots" / "sft.png").is_file()


def test_held_out_loss_is_logged_before_during_and_after(sft_overrides):
    result = sft(load_config(None, sft_overrides("sft.eval_fraction=0.25", "sft.batch_size=2", "sft.eval_every=2",
                                                "sft.epochs=2")), progress=False)
    evals = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6] and all(r["eval/rows"] == 2 for r in evals)
    assert evals[-1]["eval/loss"] != evals[0]["eval/loss"]


def test_resume_mid_epoch_gives_the_state_of_an_uninterrupted_run(sft_overrides):
    timing = ("time/", "tokens_per_s", "wall_time")
    full = sft(load_config(None, sft_overrides("sft.batch_size=2", "sft.epochs=2", "save_every=3",
                                               "keep_checkpoints=5", "model.lora_r=4", "model.lora_dropout=0.1")),
               progress=False)
    cut = full.run_dir.with_name("cut")
    shutil.copytree(full.run_dir, cut)
    for step in (6, 8):  # back to the checkpoint of step 3, in the middle of the first epoch
        shutil.rmtree(cut / "checkpoints" / f"step-{step:06d}", ignore_errors=True)
    (cut / "checkpoints" / "latest").write_text("step-000003")
    resumed = sft(load_config(cut / "config.yaml", [f"run_dir={cut}"]), resume=True, progress=False)
    assert resumed.steps_done == full.steps_done == 8

    def maths(run):
        return [{k: v for k, v in r.items() if not k.startswith(timing)} for r in read_jsonl(run / "metrics.jsonl")]

    assert maths(cut) == maths(full.run_dir)
    a = load_file(full.run_dir / "checkpoints" / "step-000008" / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "checkpoints" / "step-000008" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_max_minutes_reached_exits_0_with_a_checkpoint_to_resume(sft_overrides, capsys):
    """Reaching max_minutes is what was asked (exit 0, as `seqpg train`), said as such, and resumable."""
    overrides = sft_overrides("sft.epochs=3", "max_minutes=1e-6")
    assert main(["sft", "--no-progress", *overrides]) == 0
    out = capsys.readouterr().out
    assert "1 SFT steps done" in out and "(max_minutes reached; continue with --resume)" in out
    run = Path(load_config(None, overrides).run_dir)
    assert (run / "checkpoints" / "step-000001").is_dir()


def test_an_sft_run_exports_and_starts_rl_with_its_weights(sft_overrides, tiny_overrides, tmp_path, capsys):
    assert main(["sft", "--no-progress", *sft_overrides("sft.epochs=3")]) == 0
    run = tmp_path / "sft"
    trained = load_file(run / "checkpoints" / "step-000006" / "model.safetensors")
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in trained.items())

    rl = tiny_overrides("steps=1", "algo.kl_coef=0.1", run="rl")
    assert main(["train", "--init", str(run), "--no-progress", *rl]) == 0
    cfg = load_config(tmp_path / "rl" / "config.yaml")
    assert cfg.model.name == str(tmp_path / "rl" / "init_model")
    start, _ = build_policy(cfg.model, cfg.seed, torch.device("cpu"))  # the RL run's weights at step 0
    assert all(torch.equal(start.state_dict()[k], v) for k, v in trained.items())
    step1 = read_jsonl(tmp_path / "rl" / "metrics.jsonl")[0]
    assert abs(step1["kl"]) < 1e-5  # the reference is the warm-started model, not the tiny base
    base_ref = tiny_overrides("steps=1", "algo.kl_coef=0.1", "algo.kl_reference=tiny", run="rl-base-ref")
    assert main(["train", "--init", str(run), "--no-progress", *base_ref]) == 0
    assert read_jsonl(tmp_path / "rl-base-ref" / "metrics.jsonl")[0]["kl"] > 1e-3  # held near the base instead
    assert main(["train", "--init", str(tmp_path / "nowhere"), *tiny_overrides(run="rl2")]) == 2


@pytest.mark.parametrize("rows, line, says", [
    (["{\"messages\": [", None], 1, "not valid JSON"),
    ([None, None, {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}], 3, "has no `role`"),
    ([None, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}], 2,
     "is empty"),
    ([None, {"messages": [{"role": "user", "content": "hi"}]}], 2, "no assistant message"),
    ([None, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 300}]}], 2,
     "over the limit of 200 (sft.max_length"),
    ([None, {"text": "hi"}], 2, "give `messages`"),
])
def test_a_bad_row_is_one_line_naming_its_line_and_exits_2(rows, line, says, sft_overrides, capsys):
    good = word_rows(1)[0]
    overrides = sft_overrides("sft.max_length=200", rows=[good if r is None else r for r in rows])
    assert main(["sft", "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"demos.jsonl line {line}:" in err and says in err


def test_config_errors_of_the_sft_section_exit_2(sft_overrides, capsys):
    assert main(["sft", *sft_overrides("sft.batch_size=50")]) == 2
    assert "sft.batch_size=50 exceeds the 8 training demonstrations" in capsys.readouterr().err
    assert main(["sft", "model.name=tiny"]) == 2
    assert "sft.data is not set" in capsys.readouterr().err
    assert main(["sft", *sft_overrides("sft.eval_fraction=1")]) == 2


def test_a_kl_reference_without_a_kl_is_refused(tiny_overrides, capsys):
    assert main(["train", *tiny_overrides("algo.kl_reference=tiny")]) == 2  # tiny_overrides turns the KL off
    assert "algo.kl_coef=0 turns the KL off" in capsys.readouterr().err
