"""Configuration errors are caught before any model loads; the CLI explains every option."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from seqpg import config as C
from seqpg.apps.cli import main


def test_defaults_validate_and_yaml_round_trips(tmp_path):
    cfg = C.load_config()
    path = tmp_path / "c.yaml"
    import yaml
    path.write_text(yaml.safe_dump(C.to_dict(cfg)))
    assert C.load_config(path) == cfg


def test_overrides_are_typed_and_nested():
    cfg = C.load_config(None, ["optim.lr=1e-5", "algo.name=rloo", "sampling.stop_strings=[END]",
                               "rewards=[{kind: vader, weight: 0.8}, {kind: length, weight: -0.2}]",
                               "rewards.1.params={target: 10}"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.algo.name == "rloo" and cfg.sampling.stop_strings == ["END"]
    assert [r.weight for r in cfg.rewards] == [0.8, -0.2] and cfg.rewards[1].params == {"target": 10}


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'.*lr"),
    ("modle.name=x", "unknown config key 'modle'.*model"),
    ("steps=ten", "steps: expected an integer"),
    ("bf16=maybe", "bf16: expected true or false"),
    ("algo.name=ppo2", "algo.name='ppo2' is not valid; choose one of: a2c, ppo, grpo"),
    ("algo.agg=mean", "algo.agg='mean' is not valid.*token-mean"),
    ("sampling.temperature=0", "temperature must be > 0"),
    ("algo.kl_target=0.1 algo.kl_coef=0", "kl_target.*needs an initial algo.kl_coef"),
    ("collapse_shared_opening=1.5", "collapse_shared_opening must be a fraction in \\[0, 1\\], got 1.5"),
    ("rewards=[]", "rewards is empty"),
    ("optim.lr", "not of the form key=value"),
])
def test_bad_configuration_is_refused_with_the_key_named(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, override.split(" "))


def test_group_estimators_need_two_samples_per_prompt():
    with pytest.raises(C.ConfigError, match="samples_per_prompt to 2 or more"):
        C.load_config(None, ["algo.name=rloo", "sampling.samples_per_prompt=1"])
    C.load_config(None, ["algo.name=reinforce", "sampling.samples_per_prompt=1"])


def test_every_config_field_has_a_docstring():
    for cls in (C.TrainConfig, C.ModelConfig, C.TaskConfig, C.ScorerConfig, C.SamplingConfig, C.AlgoConfig,
                C.OptimConfig):
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, (cls.__name__, missing)


def test_unknown_scorer_kind_fails_before_any_model_loads(capsys, tmp_path):
    code = main(["train", "model.name=/nonexistent/model", "rewards=[{kind: sentiment}]", f"run_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sentiment" in err and "vader" in err  # names the bad kind and lists the valid ones


def test_unknown_task_fails_before_any_model_loads(capsys, tmp_path):
    code = main(["train", "model.name=/nonexistent/model", "task.name=no_such_task", f"run_dir={tmp_path}"])
    assert code == 2 and "no_such_task" in capsys.readouterr().err


def test_train_help_explains_every_key():
    out = subprocess.run([sys.executable, "-m", "seqpg", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key, _, _ in C.describe_config():
        assert key in out, key
    assert "--resume" in out and "Sample -> score" in out


@pytest.mark.parametrize("command", ["eval", "explain", "lab", "demo", "bench", "config"])
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "seqpg", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "usage: seqpg " + command in out


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "algo.name=ppo"]) == 0
    assert "name: ppo" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["algo.advantage_params={foo: 1}"], r"advantage estimator 'grpo' does not take \['foo'\]; it takes: eps, gamma"),
    (["algo.name=rloo", "algo.loss_params={clip_low: 0.1}"], r"policy loss 'pg' does not take \['clip_low'\]"),
    (["algo.name=remax", "algo.advantage_params={baseline: 1}"], r"'remax' does not take \['baseline'\]"),
    (["algo.advantage=gae", "algo.advantage_params={scale_by_std: false}"], r"'gae' does not take"),
])
def test_parameters_an_estimator_or_loss_does_not_take_are_refused_before_any_model(overrides, message, capsys):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, overrides)
    code = main(["train", "model.name=/nonexistent/model", *overrides])  # refused before the model is looked for
    assert code == 2 and "does not take" in capsys.readouterr().err
    C.load_config(None, ["algo.advantage_params={scale_by_std: false}", "algo.loss_params={dual_clip: 3}"])


def test_an_estimator_with_a_critic_gets_one_whatever_the_family():
    """GAE named over a critic-free family: the critic follows the estimator (no GAE without a critic)."""
    from seqpg.training.step import StepSettings

    st = StepSettings.from_config(C.load_config(None, ["algo.name=grpo", "algo.advantage=gae"]))
    assert st.needs.critic and st.family.advantage == "gae"


def test_the_readme_shows_the_errors_the_cli_prints(capsys):
    """Every `$ seqpg ...` line of the README is run, and the line under it is what it prints (status 2)."""
    import shlex
    from pathlib import Path

    from seqpg.apps.cli import main

    lines = (Path(__file__).parents[2] / "README.md").read_text().splitlines()
    shown = [(line[2:], lines[i + 1]) for i, line in enumerate(lines) if line.startswith("$ seqpg ")]
    assert len(shown) >= 2
    for command, printed in shown:
        assert main(shlex.split(command)[1:]) == 2, command
        assert capsys.readouterr().err.strip().splitlines()[-1] == printed, command
