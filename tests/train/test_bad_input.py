"""Bad input is refused in one line (exit 2 for configuration, 1 for a failed run), before any model loads
where it can be; overrides on --resume are applied and recorded, or refused by name."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seqpg import config as C
from seqpg.batch import Prompt
from seqpg.apps.cli import main, parse_args
from seqpg.rundir.checkpoint_files import step_dir_name
from seqpg.rundir.runfiles import read_jsonl


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``seqpg ARGV``; asserts stderr's last line is the one-line summary and
    that there is no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("seqpg:")]
    assert "Traceback" not in err, err
    assert len(lines) >= 1, err
    return code, lines[-1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# configuration: refused at the door, one line, exit 2


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("sampling.temperature=.nan", "sampling.temperature"), ("rewards.0.weight=.nan", "rewards[0].weight"),
    ("algo.loss_params={clip_low: .inf}", "algo.loss_params.clip_low"), ("optim.betas=[0.9, .nan]", "optim.betas[1]"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key, capsys):
    code, line = run_cli(capsys, ["config", override])
    assert code == 2 and key in line and "not a finite number" in line


@pytest.mark.parametrize("override, message", [
    ("sampling.top_k=-5", "sampling.top_k must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be > 0, or 0 to disable"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers in"),
    ("optim.on_nonfinite=ignore", "optim.on_nonfinite='ignore' is not valid; choose one of: skip, stop"),
    ("rewards.2.weight=1", "'2' is not an index of a list of 1"),
])
def test_out_of_range_values_are_refused_before_the_model(override, message, capsys):
    code, line = run_cli(capsys, ["config", override])
    assert code == 2 and message in line


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", "steps: 3\nsampling: {max_new_tokens: 4\nseed: 1\n")
    code, line = run_cli(capsys, ["train", "-c", str(path)])
    assert code == 2 and "bad.yaml" in line and "invalid YAML" in line and "line 3" in line


def test_a_tab_in_yaml_says_indent_with_spaces(tmp_path, capsys):
    path = write(tmp_path, "tab.yaml", "model:\n\tname: tiny\n")
    code, line = run_cli(capsys, ["train", "-c", str(path)])
    assert code == 2 and "line 2" in line and "indent with spaces" in line


def test_a_directory_as_config_or_task_name(tmp_path, capsys):
    code, line = run_cli(capsys, ["train", "-c", str(tmp_path)])
    assert code == 2 and "is not a file" in line
    code, line = run_cli(capsys, ["train", "model.name=tiny", "task.source=jsonl", f"task.name={tmp_path}",
                                  f"run_dir={tmp_path / 'r'}"])
    assert code == 2 and "is a directory; set task.name to the jsonl file's path" in line


@pytest.mark.parametrize("fn, message", [
    ("'{d}/nofile.py:reward'", "no file"),
    ("'{d}/rewards.py:rewrd'", "has no callable 'rewrd'"),
    ("'{d}/rewards.py:NOT_CALLABLE'", "has no callable 'NOT_CALLABLE'"),
    ("'{d}/broken.py:reward'", "raised ZeroDivisionError"),
    ("'no_such_module_xyz:reward'", "cannot import module 'no_such_module_xyz'"),
])
def test_a_reward_fn_that_cannot_be_resolved(fn, message, tmp_path, capsys):
    write(tmp_path, "rewards.py", "NOT_CALLABLE = 3\ndef reward(p, c, m):\n    return 0.0\n")
    write(tmp_path, "broken.py", "1 / 0\n")
    code, line = run_cli(capsys, ["train", "model.name=/nonexistent/model", f"run_dir={tmp_path / 'r'}",
                                  "rewards=[{kind: callable, params: {fn: " + fn.format(d=tmp_path) + "}}]"])
    assert code == 2 and message in line and "scorer 'callable'" in line


@pytest.mark.parametrize("command", [["eval", "{d}/no_run"], ["explain", "{d}/no_run", "--prompt", "x"]])
def test_eval_and_explain_on_a_missing_path(command, tmp_path, capsys):
    code, line = run_cli(capsys, [a.format(d=tmp_path) for a in command])
    assert code == 2 and "no_run' does not exist; give a run directory" in line


def test_reusing_a_run_dir_without_resume_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    code, line = run_cli(capsys, ["train", "model.name=/nonexistent/model", f"run_dir={run}"])
    assert code == 2 and "already holds a run" in line and f"--resume {run}" in line


def test_debug_shows_the_traceback_anywhere_on_the_line(capsys):
    assert main(["config", "optim.lr=.nan", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("seqpg: configuration error: optim.lr")


# ---------------------------------------------------------------------------------------------
# options and overrides in any order


def test_options_and_overrides_in_any_order(tmp_path):
    args = parse_args(["train", "-c", "X", "steps=2", "--no-progress", "task.eval_size=4"])
    assert args.config == "X" and args.no_progress and args.overrides == ["steps=2", "task.eval_size=4"]
    args = parse_args(["train", "a=1", "--resume", "R", "b=2", "--no-progress", "a=3"])
    assert args.resume == "R" and args.overrides == ["a=1", "b=2", "a=3"]  # order kept: the last a wins
    with pytest.raises(SystemExit):
        parse_args(["train", "--no-such-option"])


def test_the_issues_command_runs(tiny_overrides, tmp_path):
    cfg = write(tmp_path, "x.yaml", yaml.safe_dump(C.to_dict(C.load_config(None, tiny_overrides("task.eval_size=8")))))
    assert main(["train", "-c", str(cfg), "steps=2", "--no-progress", "task.eval_size=4"]) == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["steps"] == 2 and written["task"]["eval_size"] == 4
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# rewards and prompts


def test_a_raising_or_non_numeric_reward_is_one_line_exit_1(tiny_overrides, tmp_path, capsys):
    write(tmp_path, "r.py", "def as_text(p, c, m):\n    return '0.5'\n"
                            "def as_bool(p, c, m):\n    return True\n"
                            "def raises(p, c, m):\n    raise KeyError('answer')\n")
    base = [o for o in tiny_overrides("steps=1", "--no-progress") if not o.startswith("rewards=")]
    code, line = run_cli(capsys, ["train", *base, "rewards=[{kind: callable, params: {fn: '" + f"{tmp_path}/r.py"
                                  + ":raises'}}]"])
    assert code == 1 and "reward failed: scorer 'callable' on sample 0" in line and "KeyError" in line
    assert "on_scorer_error=zero" in line
    for fn, shown in (("as_text", "'0.5' (str), not a number"), ("as_bool", "True (bool), not a number")):
        code, line = run_cli(capsys, ["train", *base, f"run_dir={tmp_path / fn}",
                                      "rewards=[{kind: callable, params: {fn: '" + f"{tmp_path}/r.py:{fn}" + "'}}]"])
        assert code == 1 and shown in line, line


def test_a_scorer_returning_a_string_or_bool_is_refused_even_with_on_error_zero():
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
    from seqpg.rollout.sampling import generate
    from seqpg.rewards.scorers import ScorerError, make_scorer, score_batch

    tok = build_tiny_tokenizer()
    r = generate(build_tiny_model(len(tok)), tok, [Prompt("cat", "p0")], n=2, max_new_tokens=3,
                 chat_template=False, generator=torch.Generator().manual_seed(0))
    for value in ("0.5", True, [1.0]):
        s = make_scorer("callable", fn=lambda p, c, m, v=value: v)
        with pytest.raises(ScorerError, match=r"scorer 'callable' on sample 0 \(prompt id 'p0'.*not a number"):
            score_batch(r, [(s, 1.0)], on_error="zero")
    ok = make_scorer("callable", fn=lambda p, c, m: torch.tensor(0.25))
    assert score_batch(r, [(ok, 1.0)]).rewards_B.tolist() == [0.25, 0.25]


def test_an_overlong_prompt_is_refused_truncated_or_dropped_by_config(tiny_overrides, tmp_path, capsys):
    path = write(tmp_path, "long.jsonl", "".join(json.dumps({"prompt": w}) + "\n" for w in
                                                 ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea",
                                                  " ".join(["word"] * 600)]))
    base = [o for o in tiny_overrides("steps=1", "--no-progress", "task.eval_size=2") if not o.startswith("task.name")]
    code, line = run_cli(capsys, ["train", *base, f"task.name={path}", f"run_dir={tmp_path / 'a'}"])
    assert code == 2 and "prompt 'long.jsonl/8' is" in line and "over the 506" in line  # 512 - 6 new tokens
    assert "task.overlong_prompts=truncate" in line
    assert main(["train", *base, f"task.name={path}", "task.overlong_prompts=drop", f"run_dir={tmp_path / 'b'}"]) == 0
    assert "dropped prompt 'long.jsonl/8'" in capsys.readouterr().err


def test_fit_prompts_truncates_to_the_longest_start_that_fits():
    from seqpg.rewards.tasks import fit_prompts

    words = lambda t: len(t.split()) + 3  # noqa: E731 - 3 template tokens
    prompts = [Prompt("a b c", "short"), Prompt("one two three four five six", "long")]
    kept, notes = fit_prompts(prompts, words, 7, overlong="truncate")
    assert [p.text for p in kept] == ["a b c", "one two three four "] and "'long' from 9 tokens to 7" in notes[0]
    kept, notes = fit_prompts(prompts, words, 7, overlong="drop")
    assert [p.id for p in kept] == ["short"]
    with pytest.raises(ValueError, match="prompt 'long' is 9 tokens .* over the 7"):
        fit_prompts(prompts, words, 7)


@pytest.mark.parametrize("text, message", [
    ('prompt,answer\n"what is 1+1,2\nwhat is 2+2,4\nwhat is 3+3,6\n', "malformed CSV"),  # quote never closed
    ('prompt,answer\n"what is 1+1,2\nwhat is 2+2",4\nwhat is 3+3,6\n', "x.csv:2: a quoted field runs from line 2"),
    ("prompt,answer\nwhat is 1+1,2\nwhat is 2+2\nwhat is 3+3,6\n", "x.csv:3: 1 field(s) where the header has 2"),
    ("prompt,answer\nwhat is 1+1,2\nwhat is 2+2,4,5\n", "x.csv:3: 3 field(s)"),
])
def test_malformed_csv_rows_are_refused_by_line_number(text, message, tmp_path):
    from seqpg.rewards.tasks import load_prompts

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_prompts("csv", str(write(tmp_path, "x.csv", text)))


def test_csv_multiline_fields_when_asked_and_blank_lines_skipped(tmp_path):
    from seqpg.rewards.tasks import load_prompts

    path = write(tmp_path, "x.csv", 'prompt,answer\n"two\nlines",2\n\nplain,"3"\n')
    prompts = load_prompts("csv", str(path), params={"multiline_fields": True})
    assert [(p.text, p.meta["answer"]) for p in prompts] == [("two\nlines", "2"), ("plain", "3")]


# ---------------------------------------------------------------------------------------------
# non-finite training


def test_a_non_finite_loss_is_skipped_and_counted_or_stops_the_update():
    from seqpg import core
    from seqpg.model.loading import build_tiny_model, build_tiny_tokenizer
    from seqpg.rollout.sampling import generate
    from seqpg.training.update import NonFiniteError, TrainBatch, UpdateSettings, update

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=3).train()
    r = generate(model, tok, [Prompt("cat", "0"), Prompt("dog", "1")], n=2, max_new_tokens=5, chat_template=False,
                 generator=torch.Generator().manual_seed(0))
    adv, ret = core.compute_advantages("grpo", torch.tensor([0.0, 1.0, 2.0, 3.0]), r.completion_mask_BC,
                                       group_ids=r.group_ids_B)
    adv[0, 0] = float("inf")  # a poisoned advantage: the loss is not finite
    batch = TrainBatch(r, adv, ret, r.sample_logprobs_BC)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    stats = update(model, opt, batch, UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="pg", agg="token-mean", minibatches=2))
    assert stats["nonfinite_steps"] == 1.0 and stats["skipped_steps"] == 0.5  # one of two mini-batches
    with pytest.raises(NonFiniteError, match="not finite; the run stopped .* optim.on_nonfinite=skip"):
        update(model, opt, batch, UpdateSettings(kl_estimator="k3", kl_noise_floor=0.0, grad_noise=False, loss="pg", agg="token-mean", on_nonfinite="stop"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the finite half did step


def test_nan_weights_are_never_checkpointed(tiny_overrides, tmp_path, capsys, monkeypatch):
    import seqpg.training.update as U

    real = U._clip_grad_norm

    def poison(params, max_norm):  # after the backward: the weights go NaN, as an lr of NaN would make them
        norm = real(params, max_norm)
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return norm

    monkeypatch.setattr(U, "_clip_grad_norm", poison)
    code, line = run_cli(capsys, ["train", *tiny_overrides("steps=2", "save_every=1"), "--no-progress"])
    assert code == 1 and "holds NaN or inf at step 1; no checkpoint was written" in line
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_disk_full_is_one_line_exit_1(tiny_overrides, tmp_path, capsys, monkeypatch):
    import seqpg.rundir.checkpoint as C

    def full(run_dir, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "checkpoints"))

    monkeypatch.setattr(C, "save_checkpoint", full)  # what every whole-model save calls
    code, line = run_cli(capsys, ["train", *tiny_overrides("steps=1"), "--no-progress"])
    assert code == 1 and line.startswith("seqpg: disk full writing") and "--resume" in line


# ---------------------------------------------------------------------------------------------
# overrides on --resume


def test_resume_overrides_are_applied_from_the_next_step_and_recorded(tiny_overrides, tmp_path, capsys):
    first = tiny_overrides("steps=2", "save_every=1", "optim.lr=0.01", "--no-progress")
    assert main(["train", *first]) == 0
    run = tmp_path / "run"
    assert main(["train", "--resume", str(run), "steps=4", "optim.lr=0.05", "optim.weight_decay=0.1",
                 "algo.kl_coef=0.5", "--no-progress"]) == 0
    assert "resuming with changes from step 3: " in capsys.readouterr().err
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["lr"], r["kl_coef"]) for r in rows] == [(1, 0.01, 0.0), (2, 0.01, 0.0),
                                                                  (3, 0.05, 0.5), (4, 0.05, 0.5)]
    opt = torch.load(run / "checkpoints" / step_dir_name(4) / "optimizer.pt", weights_only=False)
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.1] and opt["param_groups"][0]["lr"] == 0.05
    history = read_jsonl(run / "config_history.jsonl")
    assert history[-1]["step"] == 3 and history[-1]["changes"]["optim.lr"] == {"from": 0.01, "to": 0.05}
    assert set(history[-1]["changes"]) == {"steps", "optim.lr", "optim.weight_decay", "algo.kl_coef"}
    written = C.load_config(run / "config.yaml")
    assert (written.optim.lr, written.optim.weight_decay, written.algo.kl_coef, written.steps) == (0.05, 0.1, 0.5, 4)


def test_resume_refuses_by_name_what_cannot_change_mid_run(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides("steps=1", "--no-progress")]) == 0
    capsys.readouterr()
    code, line = run_cli(capsys, ["train", "--resume", str(tmp_path / "run"), "steps=2", "model.tiny_layers=3",
                                  "sampling.samples_per_prompt=2", "seed=5"])
    assert code == 2 and "--resume cannot change model.tiny_layers, sampling.samples_per_prompt, seed" in line
    assert "model.tiny_layers=2" in line
    assert C.load_config(tmp_path / "run" / "config.yaml").steps == 1  # the record is untouched


# ---------------------------------------------------------------------------------------------
# edges that escaped as bare exceptions (exit 1): now exit 2 naming the key or the file


@pytest.mark.parametrize("override, words", [
    ("optim.lr=" + "9" * 400, "optim.lr: an integer of 400 digits is too large for a number"),
    ("steps=" + "9" * 400, "steps: an integer of 400 digits is too large; give an integer below 2**64"),
    ("task.params={a: " + "9" * 4301 + "}", "override task.params: an integer of more than 4300 digits"),
    ("task.params=&a {b: *a}", "override task.params: a YAML anchor is used inside itself"),
    ('sampling.stop_strings=["</a>", ""]', "sampling.stop_strings[1] is empty: it would end every completion"),
])
def test_override_edges_exit_2_naming_the_key(override, words, capsys):
    code, line = run_cli(capsys, ["config", override])
    assert code == 2 and words in line, line


@pytest.mark.parametrize("text, words", [
    ("task:\n  params: &a {x: *a}\n", "a YAML anchor is used inside itself"),
    ("rewards:\n- kind: length\n  params: &a {x: [1, *a]}\n", "a YAML anchor is used inside itself"),
    ("seed: " + "9" * 4301 + "\n", "an integer of more than 4300 digits"),
    ("task:\n  params: {deep: " + "[" * 3000 + "]" * 3000 + "}\n", "nested too deeply to read"),
])
def test_yaml_edges_exit_2_naming_the_file(text, words, tmp_path, capsys):
    path = write(tmp_path, "edge.yaml", text)
    code, line = run_cli(capsys, ["config", "-c", str(path)])
    assert code == 2 and f"config file {str(path)!r}: {words}" in line, line


def test_a_yaml_anchor_used_twice_but_not_inside_itself_is_fine(tmp_path, capsys):
    path = write(tmp_path, "shared.yaml", "task:\n  params: {a: &p {x: 1}, b: *p}\n")
    assert main(["config", "-c", str(path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["task"]["params"] == {"a": {"x": 1}, "b": {"x": 1}}


_ENV = '''
class Env:
    def reset(self, prompt, seed):
        return "hi"

    def step(self, text):
        return None, 0.0, True, {}
'''


@pytest.mark.parametrize("head, words", [
    ("raise RuntimeError('no key set')", "importing '{file}' failed: RuntimeError: no key set"),
    ("x = 1 / 0", "importing '{file}' failed: ZeroDivisionError: division by zero"),
    ("import sys\nsys.exit(4)", "importing '{file}' failed: SystemExit: 4"),
    ("import no_such_module_q", "importing '{file}' failed: ModuleNotFoundError: No module named 'no_such_module_q'"),
])
def test_an_environment_file_whose_import_raises_exits_2_naming_it(head, words, tmp_path, capsys):
    path = write(tmp_path, "env_file.py", head + "\n" + _ENV)
    code, line = run_cli(capsys, ["config", "model.name=tiny", f"episode.env={path}:Env"])
    assert code == 2 and f"environment '{path}:Env'" in line and words.format(file=path) in line, line


def test_an_environment_file_with_future_annotations_and_a_dataclass_loads(tmp_path, capsys):
    from seqpg.rollout.environments import load_environment

    path = write(tmp_path, "dc_env.py", "from __future__ import annotations\nfrom dataclasses import dataclass\n\n\n"
                 "@dataclass\nclass State:\n    turns: int = 0\n    seen: list[str] | None = None\n" + _ENV)
    assert main(["config", "model.name=tiny", f"episode.env={path}:Env"]) == 0, capsys.readouterr().err
    module = sys.modules[load_environment(f"{path}:Env").__module__]
    assert module.State(2).turns == 2


def test_a_tool_timeout_that_would_overflow_is_refused(tmp_path, capsys):
    path = write(tmp_path, "env_file.py", _ENV)
    code, line = run_cli(capsys, ["config", "model.name=tiny", f"episode.env={path}:Env", "episode.tool_timeout_s=3000000"])
    assert code == 2 and "episode.tool_timeout_s must be > 0 and at most 3600" in line, line


def test_reaching_max_minutes_is_done_exit_0_with_a_checkpoint(tiny_overrides, capsys):
    from seqpg.rundir.checkpoint import latest_checkpoint

    argv = tiny_overrides("steps=50", "max_minutes=0.0001", "--no-progress")
    assert main(["train", *argv]) == 0
    out = capsys.readouterr().out
    assert "1 steps done" in out and "max_minutes=0.0001 reached; continue with --resume" in out
    run = Path(next(a for a in argv if a.startswith("run_dir=")).split("=", 1)[1])
    assert latest_checkpoint(run).name == step_dir_name(1)
