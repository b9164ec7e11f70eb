"""Tools that misbehave, and tool calls written to break the parser: the run neither crashes nor keeps
their processes, descriptors, output or memory (seqpg.rollout.tools; not a sandbox, a good neighbour)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from seqpg.rollout.tools import ToolCall, ToolLimits, load_tools, parse_tool_calls, run_tool_calls
from seqpg.rundir.runlock import RunInUse, RunLock

sys.path.insert(0, str(Path(__file__).parents[1] / "rollout"))
NAMES = ("add", "start_sleep", "start_sleep_and_hang", "leave_a_daemon", "survive_sigterm", "chatty", "allocate",
         "spin", "write_file")


@pytest.fixture(scope="module")
def tools():
    return load_tools([f"tool_fixtures:{n}" for n in NAMES])


def run_one(tools, name, limits=ToolLimits(timeout_s=2.0), **arguments):
    (result,) = run_tool_calls([ToolCall(name, arguments)], tools, limits)
    return result


def gone(pid: int, within_s: float = 3.0) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for init to reap it counts as ended)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# the parser: every hostile body is `malformed`, nothing raises


@pytest.mark.parametrize("body", [
    "[" * 1000 + "]" * 1000,
    '{"name": "add", "arguments": {"a": ' + "[" * 1000 + "]" * 1000 + ', "b": 1}}',
    '{"name": "add", "arguments": {"a": ' + "9" * 4301 + ', "b": 1}}',
    "[" * 100_000,
])
def test_hostile_call_bodies_are_malformed_not_exceptions(tools, body):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>", tools)
    assert call.error == "malformed" and "not valid JSON" in call.message


def test_calls_past_the_turn_cap_are_not_run(tools):
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' * 50 + "<tool_call>{"
    calls = parse_tool_calls(text, tools, max_calls=3)
    assert [c.error for c in calls] == [None] * 3 + ["too_many_calls"] * 48
    assert "at most 3 tool calls run per turn" in calls[-1].message
    results = run_tool_calls(calls, tools, ToolLimits(timeout_s=2.0))
    assert [r.content for r in results[:3]] == ["3"] * 3 and {r.error for r in results[3:]} == {"too_many_calls"}


# ---------------------------------------------------------------------------------------------
# processes: killed as a group, no handler or descriptor of the trainer's


def test_a_finished_tool_leaves_no_process_behind(tools):
    result = run_one(tools, "start_sleep", seconds=60)
    assert result.error is None and gone(int(result.content)), "the tool's `sleep` outlived the call"


def test_a_timed_out_tool_and_its_children_are_killed(tools):
    result = run_one(tools, "start_sleep_and_hang", ToolLimits(timeout_s=0.5), seconds=60)
    assert result.error == "timeout"
    assert gone(int(result.output.split()[0])), "the timed-out tool's `sleep` is still running"


def test_the_trainers_signal_handlers_do_not_reach_the_tool(tools):
    caught = []
    previous = signal.signal(signal.SIGTERM, lambda *a: caught.append(a))  # as the trainer's StopFlag does
    try:
        result = run_one(tools, "survive_sigterm", x=0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.error == "crashed" and "killed by SIGTERM" in result.content and not caught


def test_a_tools_leftover_process_does_not_hold_the_run_lock(tools, tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        daemon = int(run_one(tools, "leave_a_daemon", seconds=30).content)
    finally:
        lock.release()
    try:
        assert not gone(daemon, within_s=0.2)  # it left the process group, so it is still there ...
        try:
            RunLock(tmp_path).acquire()  # ... but it does not hold the lock: the next run may start
        except RunInUse as e:
            pytest.fail(f"a tool's leftover process holds the run lock: {e}")
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_output_is_captured_and_cut(tools, capfd):
    result = run_one(tools, "chatty", ToolLimits(timeout_s=5.0, max_chars=60), x=10_000)
    out, err = capfd.readouterr()
    assert "to stdout" not in out + err and "raw fd 1" not in out + err  # nothing in the trainer's log
    assert result.content == "done" and result.error is None
    assert {"to stdout", "to stderr", "raw fd 1"} <= set(result.output.splitlines()) and len(result.output) == 60


# ---------------------------------------------------------------------------------------------
# resource limits


def test_memory_limit(tools):
    small = run_one(tools, "allocate", ToolLimits(timeout_s=10.0, memory_mb=64), mb=16)
    assert small.content == f"allocated {16 * 2**20}"
    big = run_one(tools, "allocate", ToolLimits(timeout_s=10.0, memory_mb=64), mb=512)
    assert big.error == "raised" and big.content.startswith("error: MemoryError")


def test_cpu_limit(tools):
    result = run_one(tools, "spin", ToolLimits(timeout_s=30.0, cpu_s=1), x=0)
    assert result.error == "crashed" and "SIGXCPU" in result.content and "CPU time limit of 1 s" in result.content


def test_file_size_limit(tools, tmp_path):
    result = run_one(tools, "write_file", ToolLimits(timeout_s=10.0, file_mb=1), path=str(tmp_path / "f"), mb=3)
    assert result.error == "raised" and "File too large" in result.content
    assert (tmp_path / "f").stat().st_size <= 2**20


def test_a_call_that_cannot_fork_is_an_error_not_an_exception(tools, monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    results = run_tool_calls([ToolCall("add", {"a": 1, "b": 2})] * 2, tools, ToolLimits(timeout_s=1.0))
    assert [r.error for r in results] == ["crashed"] * 2 and "could not start" in results[0].content
