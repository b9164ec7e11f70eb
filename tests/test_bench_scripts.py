"""Every script in bench/ runs: each Python script end to end on the tiny model with a tiny budget (in
subprocesses, two at a time), the shell script parsed with its Python entry points checked.

The scripts measure; here only that they run through and print their result line is checked."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

SMOKE_ARGS = {
    "cpu_decode_step_ab.py": ["HEAD", "1", "1", "--model", "tiny", "--new-tokens", "4"],
    "cpu_products_ab.py": ["1", "--layers", "1", "--rounds", "3"],
    "cpu_sampling_ab.py": ["leave", "1", "1", "--model", "tiny", "--new-tokens", "4"],
    "episode_speed_ab.py": ["--model", "tiny", "--turn-tokens", "4", "--reps", "1", "--threads", "1",
                            "--max-episode-tokens", "256"],
    "gns_overhead_ab.py": ["tiny", "3", "4", "", "1"],  # 1 prompt x 8 samples in micro-batches of 4
    "gns_parts.py": ["--model", "tiny", "--rounds", "3"],
    "gpu_ab.py": ["--model", "tiny", "--rounds", "1", "--out", "{tmp}/ab.json"],
    "sampling_profile.py": ["1", "1", "--model", "tiny", "--new-tokens", "4"],
    "gemma3_sampling_ab.py": ["1", "1", "tiny"],
    "logprob_disagreement.py": ["--tiny", "--prompts", "2", "--samples", "2", "--max-new-tokens", "4", "--threads", "1"],
    "kl_default.py": ["--name", "smoke", "-c", "examples/demo.yaml", "--minutes", "0.01", "--eval-samples", "2",
                      "--arms", "loss,reward",  # the trl arm needs the bench extra, which `make test` does not install
                      "--out", "{tmp}", "model.name=tiny", "task.eval_size=4", "sampling.max_new_tokens=4",
                      "sampling.chat_template=false", "tensorboard=false"],
    "sampler_precision_ab.py": ["1", "--model", "tiny", "--new-tokens", "4"],
    "shared_prefix_ab.py": ["--model", "tiny", "--reps", "1", "--set", "episode.tools=[]",
                            "episode.max_episode_tokens=512", "sampling.max_new_tokens=4"],
}
"""Script -> the arguments of its smoke run (``{tmp}``: a fresh directory)."""

RESULT_LINE = {
    "cpu_decode_step_ab.py": "logits equal bit for bit",
    "cpu_products_ab.py": "ms/token; fp32/packed median of rounds",
    "cpu_sampling_ab.py": "identical rollouts",
    "episode_speed_ab.py": "multi-turn sampling, model's forward / fast decoder",
    "gns_overhead_ab.py": "median paired difference",
    "gns_parts.py": "median paired difference",
    "gpu_ab.py": "| variant | median ms | x first | agrees with the first |",
    "sampling_profile.py": "HF generate: median",
    "gemma3_sampling_ab.py": "model forward / fast =",
    "logprob_disagreement.py": "sampler vs reference",
    "kl_default.py": "| arm | steps | greedy reward | sampled reward |",
    "sampler_precision_ab.py": "sampler precision A/B done",
    "shared_prefix_ab.py": "episodes with the same tokens as shared",
}
"""What each script prints when it ran through."""

OTHER_TESTS = {"dapo_demo_table.py", "dapo_demo_ab.sh", "sft_then_rl.py", "trl_arm.py"}
"""Scripts tested below on their own (they read a run's files, or need the real model for minutes)."""


def _run(name: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [a.format(tmp=tmp) for a in SMOKE_ARGS[name]]
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Script -> a future of its smoke run's completed process: all started at once, two at a time."""
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run, name, tmp_path_factory.mktemp(name.removesuffix(".py")))
               for name in SMOKE_ARGS}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts == set(SMOKE_ARGS) | OTHER_TESTS
    assert set(RESULT_LINE) == set(SMOKE_ARGS)


@pytest.mark.parametrize("name", sorted(SMOKE_ARGS))
def test_bench_script_runs_on_the_tiny_model(name, smoke_runs):
    done = smoke_runs[name].result()
    output = done.stdout + done.stderr
    if name == "cpu_decode_step_ab.py" and done.returncode == 1 and "logits differ by" in done.stderr:
        return  # ran through a decode step: the working tree's decoder differs from HEAD's, as it may
    assert done.returncode == 0, f"{name} failed:\n{output[-3000:]}"
    assert RESULT_LINE[name] in done.stdout, output[-3000:]


def test_dapo_demo_table_reads_both_runs(tmp_path):
    for name, reward in (("plain", 0.25), ("dapo", 0.5)):
        rows = [{"step": 1, "time/step": 2.0, "truncated_frac": 0.5, "dynamic/rounds": 2.0},
                {"step": 2, "time/step": 3.0, "truncated_frac": 0.0},
                {"step": 2, "eval/reward_mean": reward, "eval/reward_se": 0.125}]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, str(BENCH / "dapo_demo_table.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # 2 steps, draws (2 + 1) / 2, truncated (0.5 + 0) / 2; the evaluation after 2 + 3 s of training
    assert lines[0].startswith("plain: 2 steps, mean draws/step 1.50, mean truncated 0.250")
    assert lines[1].split() == ["step", "2", "5s", "+0.250±0.125"]
    assert lines[3].split() == ["step", "2", "5s", "+0.500±0.125"]


def test_dapo_demo_ab_script_parses_and_its_commands_exist():
    script = BENCH / "dapo_demo_ab.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for path in re.findall(r"\bbench/\w+\.py\b", text):
        assert (ROOT / path).is_file(), path
    commands = set(re.findall(r"python -m (\w+) (\w+)", text))
    assert commands == {("seqpg", "train")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for module, command in commands:
        done = subprocess.run([sys.executable, "-m", module, command, "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_dapo_demo_ab_script_gives_train_a_valid_configuration(tmp_path):
    """The script run through, with ``python -m seqpg train ARGS`` answered by ``seqpg config ARGS``: both runs'
    options resolve (an unknown key or a bad value exits 2), the DAPO run with its two switches on."""
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f'''#!/usr/bin/env bash
[ "$1 $2 $3" = "-m seqpg train" ] || exit 97
shift 3
exec {sys.executable} -m seqpg config "$@"
''')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(BENCH / "dapo_demo_ab.sh"), str(out), "3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    plain, dapo = (Path(f"{out}.{name}.log").read_text() for name in ("plain", "dapo"))
    assert done.returncode == 0, done.stderr + plain + dapo
    assert "max_minutes: 3" in plain and f"run_dir: {out}/plain" in plain and f"run_dir: {out}/dapo" in dapo
    assert "dynamic_sampling: false" in plain and "dynamic_sampling: true" in dapo
    assert "overlong_filter: false" in plain and "overlong_filter: true" in dapo


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["sft_then_rl.py", "trl_arm.py"])
def test_sft_then_rl_scripts_parse(script):
    """The equal-wall-clock comparison runs for an hour on the real model: here its options are checked."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--minutes" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("task", ["secret_code", "staff_directory"])
def test_sft_then_rl_tasks_validate_and_name_their_demonstrations_script(task):
    from seqpg.config import load_config

    config = str(ROOT / "examples" / f"env_{task}.yaml")
    load_config(config, [])
    assert _bench_module("sft_then_rl").demos_script(config) == (ROOT / "scripts" / "task_demos.py",
                                                                 f"examples/{task}_demos.jsonl")


def test_sft_then_rl_refuses_a_config_without_a_demonstrations_script():
    with pytest.raises(SystemExit, match="needs sft.data"):
        _bench_module("sft_then_rl").demos_script(str(ROOT / "examples" / "env_calculator.yaml"))


def test_trl_arm_scores_the_final_answer_with_the_task_environment_and_trains_the_sft_split():
    trl_arm = _bench_module("trl_arm")
    cfg, train, tools, env_cls = trl_arm.load_task(str(ROOT / "examples" / "env_staff_directory.yaml"), [])
    assert list(tools) == ["lookup_person"] and len(train) == cfg.task.train_size
    name = train[0].text
    env = env_cls()
    question = env.reset(train[0], 0)
    record = tools["lookup_person"].fn(name)
    right = f"<answer>{env.number}</answer>"
    episode = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "lookup_person", "arguments": {"name": name}}}]}, {"role": "tool", "content": record}]
    reward = trl_arm.make_reward(env_cls)
    rewards = reward([episode + [{"role": "assistant", "content": right}],
                      episode + [{"role": "assistant", "content": "<answer>0000x</answer>"}], episode],
                     prompt_text=[name] * 3, prompt_id=[train[0].id] * 3)
    assert question and rewards == [1.0, 0.0, 0.0]
    rows = trl_arm.sft_rows(cfg, tools)
    demos = (ROOT / cfg.sft.data).read_text().splitlines()
    assert len(rows) == len(demos) - round(cfg.sft.eval_fraction * len(demos))  # seqpg sft's held-out rows left out
    assert all(r["tools"] == [tools["lookup_person"].schema] for r in rows)


def test_sft_then_rl_runs_every_arm_asked_for_and_compares_c_with_each(tmp_path, monkeypatch):
    """The orchestration with the training and evaluation stubbed: each seqpg run's options, the time left to
    (c)'s RL, the dynamic-sampling and TRL arms, and the table of differences."""
    bench = _bench_module("sft_then_rl")
    calls, evaluated = [], []

    def fake_seqpg(*args):
        calls.append(args)
        run = Path(next(a for a in args if a.startswith("run_dir=")).removeprefix("run_dir="))
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step": 30.0}) + "\n")
        return 30.0

    def fake_run(cmd, **kwargs):
        calls.append(tuple(cmd))
        if cmd[1].endswith("trl_arm.py"):
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "timing.json").write_text(json.dumps({"sft_minutes": 1.0, "grpo_minutes": 3.0}))
        return subprocess.CompletedProcess(cmd, 0)

    def fake_evaluate(target, config, out, overrides, name, samples, n_prompts):
        evaluated.append((name, samples, n_prompts))
        return {"mean_reward": 0.5 if "c_sft_rl" in target else 0.25, "se_reward": 0.05, "sampled_reward": None}

    monkeypatch.setattr(bench, "seqpg", fake_seqpg)
    monkeypatch.setattr(bench, "evaluate", fake_evaluate)
    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    out = tmp_path / "out"
    assert bench.main(["--config", "examples/env_staff_directory.yaml", "--minutes", "4", "--out", str(out),
                       "--dynamic-sampling", "--trl", "--eval-prompts", "3", "threads=1"]) == 0
    assert calls[0][1].endswith("scripts/task_demos.py")
    rl = [c for c in calls if c[0] == "train" and "--init" in c]
    assert [c[c.index("--init") + 1] for c in rl] == [str(out / "runs" / "c_sft")] * 2
    assert all("max_minutes=3.5" in c and "threads=1" in c for c in rl)  # 4 minutes less (c)'s 0.5 of SFT
    assert "sampling.dynamic_sampling=true" not in rl[0] and "sampling.dynamic_sampling=true" in rl[1]
    assert [e[0] for e in evaluated] == ["smollm2-135m-instruct", "a_rl", "b_sft", "c_sft", "c_sft_rl", "c_sft_rl_dyn",
                                        "d_trl_sft", "d_trl_final"]
    assert {e[1:] for e in evaluated} == {(0, 3)}
    results = json.loads((out / "results.json").read_text())
    assert results["(c) SFT then RL"]["trained_minutes"] == 1.0  # SFT 0.5 + RL 0.5
    assert results["(d) TRL SFT then GRPO"]["trained_minutes"] == 4.0
    table = (out / "results.md").read_text()
    assert "(c) - (d) TRL SFT then GRPO: +0.250 = +3.5 standard errors" in table
    assert "(c) - (c-dyn) SFT then RL, dynamic sampling: +0.000" in table and "(c) - base model" not in table
