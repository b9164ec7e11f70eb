"""The README's examples cannot drift: every `seqpg ...` command in its bash blocks parses with the CLI's own
parser, and a configuration it names loads and validates; its Python blocks run (the training example on
the tiny model, for seconds); its reward function and YAML load and score; the line count stays a guide's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from seqpg.apps.cli import parse_args
from seqpg.config import load_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("seqpg "):
                out.append(shlex.split(line)[1:])
    return out


def test_the_readme_is_a_guide_not_a_notebook():
    assert len(README.splitlines()) <= 250
    assert README.startswith("# seqpg\n\n```bash\nmake demo")
    assert not re.search(r"this round|this release|this session|session \d", README, flags=re.I)
    assert "TODO" not in README and not re.search(r"^[A-Z_]{6,}$", README, flags=re.M)  # no unfilled markers


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_command_parses_and_its_configuration_validates(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 0
        return
    args = parse_args(argv)
    config = getattr(args, "config", None)
    if config:
        assert (ROOT / config).is_file(), config
        load_config(config, list(getattr(args, "overrides", []) or []))


def test_the_python_examples_run(tiny_overrides, monkeypatch, tmp_path):
    import seqpg.config as config_mod

    api, maths = blocks("python")[:2]
    exec(compile(maths, "README maths example", "exec"), {})
    real = config_mod.load_config
    # the training example on the tiny model: the README's file and overrides, then the tiny model's
    monkeypatch.setattr(config_mod, "load_config", lambda path, overrides: real(path, [*overrides, *tiny_overrides(
        "steps=2", "rewards=[{kind: vader}]")]))
    monkeypatch.chdir(ROOT)
    env: dict = {}
    exec(compile(api, "README API example", "exec"), env)
    assert env["result"].run_dir.is_dir() and "reward_mean" in env["result"].final_metrics


def test_the_reward_example_scores(tmp_path, monkeypatch):
    reward_py = next(b for b in blocks("python") if b.startswith("# my_rewards.py"))
    (tmp_path / "my_rewards.py").write_text(reward_py)
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_my_rewards", tmp_path / "my_rewards.py")
    my_rewards = importlib.util.module_from_spec(spec)  # by path: another test may have a `my_rewards` imported
    spec.loader.exec_module(my_rewards)

    assert my_rewards.short_and_kind("p", "Thanks, that is kind.", {}) == 1.0
    assert my_rewards.short_and_kind("p", "No.", {}) == 0.0
    yaml_block = next(b for b in blocks("yaml") if b.startswith("rewards:"))
    (tmp_path / "cfg.yaml").write_text(yaml_block)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(tmp_path / "cfg.yaml"), [])
    assert [r.name for r in cfg.rewards] == ["kind", "sentiment"]
    from seqpg.training.build import build_scorers
    assert len(build_scorers(cfg.rewards)) == 2


def test_the_environment_example_trains(tiny_overrides, tmp_path):
    """The README's environment, saved as cart.py, trains two steps on the tiny model; its tool is the method."""
    from seqpg.rundir.runlog import read_jsonl
    from seqpg.training.trainer import train

    cart_py = next(b for b in blocks("python") if b.startswith("# cart.py"))
    (tmp_path / "cart.py").write_text(cart_py)
    # raw text: the tiny model's 512 character positions have no room for a template with tool descriptions
    cfg = load_config(None, tiny_overrides("rewards=[]", f"episode.env={tmp_path / 'cart.py'}:CartEnv",
                                           "episode.max_turns=2", "episode.max_episode_tokens=500",
                                           "sampling.chat_template=false", "sampling.prompts_per_step=2",
                                           "sampling.samples_per_prompt=2", "steps=2"))
    rows = read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all("episode/turns" in r for r in rows)
