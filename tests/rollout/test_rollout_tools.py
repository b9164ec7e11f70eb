"""Tools: loading refuses non-functions, the parser turns every malformed call into an error
observation, and the runner survives tools that sleep forever, raise, flood or are unprintable."""

from __future__ import annotations

import os
import sys
import time

import pytest

from seqpg.rollout.tools import (ToolCall, ToolLimits, ToolStats, describe_tools, load_tool, load_tools,
                                 parse_tool_calls, run_tool_calls, template_takes_tools, with_tools)

sys.path.insert(0, os.path.dirname(__file__))
FIX = "tool_fixtures"


@pytest.fixture
def tools():
    return load_tools([f"{FIX}:{n}" for n in ("add", "sleep_forever", "explode", "huge", "unprintable")])


def call(text, tools):
    return parse_tool_calls(text, tools)


def test_schema_from_signature_and_docstring(tools):
    fn = tools["add"].schema["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers."
    assert fn["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert fn["parameters"]["required"] == ["a", "b"]


@pytest.mark.parametrize("spec, error, words", [
    (f"{FIX}:NOT_A_FUNCTION", TypeError, "must be a plain Python function, got a int"),
    (f"{FIX}:Unprintable", TypeError, "must be a plain Python function, got a type"),
    (f"{FIX}:undocumented", ValueError, "no JSON schema from its signature and docstring"),
    (f"{FIX}:missing", AttributeError, "has no attribute 'missing'"),
    ("no_module_here_q:f", ImportError, "cannot import module 'no_module_here_q'"),
    ("nocolon", ValueError, "expected 'module:function'"),
])
def test_bad_tools_are_named(spec, error, words):
    with pytest.raises(error, match=words) as e:
        load_tool(spec)
    assert spec in str(e.value)


def test_duplicate_names_refused():
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        load_tools([f"{FIX}:add", f"{FIX}:add"])


def test_parser_reads_calls_and_names_each_error(tools):
    ok = call('Let me add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>', tools)
    assert [(c.name, c.arguments, c.error) for c in ok] == [("add", {"a": 2, "b": 3}, None)]
    assert call("no call here", tools) == []
    cases = {
        '<tool_call>{"name": "add", "arguments": {"a": 2,}}</tool_call>': "malformed",
        '<tool_call>["add"]</tool_call>': "malformed",
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}': "malformed",  # never closed
        '<tool_call>{"name": "mul", "arguments": {}}</tool_call>': "unknown_tool",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>': "bad_arguments",
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>': "bad_arguments",
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>': "bad_arguments",
    }
    for text, kind in cases.items():
        (c,) = call(text, tools)
        assert c.error == kind, text
        assert c.message


def test_runner_survives_every_bad_tool(tools):
    text = "".join(f'<tool_call>{{"name": "{n}", "arguments": {args}}}</tool_call>' for n, args in [
        ("add", '{"a": 2, "b": 3}'), ("sleep_forever", '{"x": 1}'), ("explode", '{"x": 7}'), ("huge", '{"x": 1}'),
        ("unprintable", '{"x": 1}'), ("nope", '{}')])
    stats = ToolStats()
    t0 = time.monotonic()
    results = run_tool_calls(call(text, tools), tools, ToolLimits(timeout_s=1.0, max_chars=100), stats)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"the runner waited {elapsed:.1f} s for a 1 s limit"  # concurrent: ~1 s + forks
    add, sleep, explode, huge, unprintable, unknown = results
    assert (add.content, add.error) == ("5", None)
    assert sleep.error == "timeout" and "time limit of 1 s" in sleep.content
    assert explode.error == "raised" and "ValueError: bad x 7" in explode.content
    assert huge.error == "truncated" and huge.content.startswith("y" * 100 + "\n[truncated: 10000000 characters")
    assert len(huge.content) < 200
    assert unprintable.error == "unprintable" and "Unprintable" in unprintable.content
    assert unknown.error == "unknown_tool"
    assert stats.calls == 6
    assert dict(stats.errors) == {"timeout": 1, "raised": 1, "truncated": 1, "unprintable": 1, "unknown_tool": 1}
    assert add.as_message() == {"role": "tool", "name": "add", "content": "5"}


def _children() -> set[int]:
    from pathlib import Path

    return {int(p) for f in Path("/proc/self/task").glob("*/children") for p in f.read_text().split()}


def test_timed_out_tool_process_is_gone(tools):
    before = _children()
    (r,) = run_tool_calls([ToolCall("sleep_forever", {"x": 1})], tools, ToolLimits(timeout_s=0.3))
    assert r.error == "timeout"
    assert _children() == before  # killed and reaped, not left spinning


def test_template_without_tools_gets_a_system_message(tiny_tokenizer, tools):
    assert not template_takes_tools(tiny_tokenizer, tools)  # SmolLM2's ChatML ignores tools=
    msgs, kwargs = with_tools([{"role": "user", "content": "hi"}], tools, in_template=False)
    assert kwargs == {} and msgs[0]["role"] == "system" and msgs[0]["content"] == describe_tools(tools)
    assert '"name": "add"' in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
    msgs, _ = with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools, False)
    assert len(msgs) == 2 and msgs[0]["content"].startswith("Be brief.\n\nYou may call these tools")


def test_template_with_tools_is_detected(tiny_tokenizer, tools):
    tiny_tokenizer.chat_template = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
                                    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert template_takes_tools(tiny_tokenizer, tools)
    msgs, kwargs = with_tools([{"role": "user", "content": "hi"}], tools, in_template=True)
    assert msgs == [{"role": "user", "content": "hi"}] and [t["function"]["name"] for t in kwargs["tools"]] == [
        "add", "sleep_forever", "explode", "huge", "unprintable"]


# ---------------------------------------------------------------------------------------------
# how calls run: at most max_parallel at once, each in a process group of its own with its limits


@pytest.fixture
def runner_tools():
    return load_tools([f"{FIX}:{n}" for n in ("add", "nap", "rlimits", "who")])


def test_calls_run_at_most_max_parallel_at_once_each_timed_from_its_start(runner_tools):
    import json

    calls = [ToolCall("nap", {"seconds": 0.4}) for _ in range(6)]
    results = run_tool_calls(calls, runner_tools, ToolLimits(timeout_s=2.0, max_parallel=2))
    assert [r.error for r in results] == [None] * 6  # 3 rounds of 0.4 s, none timed out against a 2 s limit
    spans = [json.loads(r.content) for r in results]
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most == 2, spans


def test_each_call_has_its_own_process_group_and_session(runner_tools):
    import json

    (r,) = run_tool_calls([ToolCall("who", {"x": 0})], runner_tools)
    me = json.loads(r.content)
    assert me["pgid"] == me["sid"] == me["pid"] != os.getpid() and me["sid"] != os.getsid(0)


def test_resource_limits_are_set_in_the_call(runner_tools):
    import json
    import resource

    limits = ToolLimits(memory_mb=100, cpu_s=7, file_mb=3, max_processes=5)
    (r,) = run_tool_calls([ToolCall("rlimits", {"x": 0})], runner_tools, limits)
    got = json.loads(r.content)
    assert got["RLIMIT_CPU"] == 7 and got["RLIMIT_FSIZE"] == 3 * 2**20
    assert got["RLIMIT_AS"] != resource.RLIM_INFINITY and got["RLIMIT_AS"] > 100 * 2**20  # the trainer's copy + 100 MB
    assert got["RLIMIT_NPROC"] not in (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    (r,) = run_tool_calls([ToolCall("rlimits", {"x": 0})], runner_tools,
                          ToolLimits(memory_mb=0, cpu_s=0, file_mb=0, max_processes=0))
    assert json.loads(r.content) == {k: resource.getrlimit(getattr(resource, k))[0] for k in got}  # 0: left as is


def test_results_come_back_without_pickle(runner_tools, monkeypatch):
    import multiprocessing.reduction
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickled")

    monkeypatch.setattr(multiprocessing.reduction.ForkingPickler, "dumps", classmethod(refuse))
    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    (r,) = run_tool_calls([ToolCall("add", {"a": 2, "b": 40})], runner_tools)
    assert (r.content, r.error) == ("42", None)
