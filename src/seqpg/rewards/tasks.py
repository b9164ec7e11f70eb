"""Prompt sources: where the prompts of a run come from, how they split, and the order they are drawn in.

    load_prompts(source, name, ...)   -> list[Prompt]          one registered source, one signature
    train_eval_prompts(...)           -> (train, eval)         held-out prompts never seen in training
    PromptStream(train, seed=...)     -> Prompt, Prompt, ...   infinite, reshuffled each epoch, resumable

Sources (``PROMPT_SOURCES``), all called as
``fn(name, *, size, seed, params, prompt_column, instruction) -> list[Prompt]``:

* ``reasoning_gym``: procedurally generated tasks (``reasoning_gym.create_dataset(name, size, seed, **params)``).
  ``Prompt.meta`` holds the entry and what re-creates its dataset, so the verifier can score it later,
  in another process or after a restart.
* ``jsonl`` / ``csv``: a file with a prompt column; the other columns go into ``Prompt.meta``
  (e.g. an ``answer`` column for the ``exact_match`` scorer).
* ``hf_datasets``: local Hugging Face ``datasets`` data (a ``save_to_disk`` directory or parquet/json/jsonl/
  csv/arrow files). Only local paths are accepted, so nothing is ever fetched from the hub.

Held-out prompts: two prompts are "the same" when their normalised text (case-folded, whitespace
collapsed) is equal. ``split_prompts`` de-duplicates before splitting, so train and eval never share a
prompt. Reasoning-gym items are generated with ``Random(seed + index)``, so datasets with nearby seeds
share items; ``train_eval_prompts`` draws eval from a distant seed *and* removes every eval prompt from
the training set.
"""

from __future__ import annotations

import copy
import csv
import glob
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from seqpg.batch import Prompt
from seqpg.core.registry import Registry

ANSWER_INSTRUCTION = "Give the final answer inside <answer></answer> tags."
"""Default format instruction appended to reasoning-gym questions (the verifier reads the tags).
An example value in it ("e.g. <answer>7</answer>") made SmolLM2-135M answer 7 far too often
(greedy last-number accuracy 31% instead of 52% on 1-digit a±b; docs/default_task.md)."""

EVAL_SEED_OFFSET = 1_000_000_007
"""Eval prompts of generated sources use ``seed + EVAL_SEED_OFFSET`` (mod 2**32), far from the train seed."""

PROMPT_SOURCES = Registry("prompt source", positional=("name",),
                          shared=("size", "seed", "params", "prompt_column", "instruction"))
"""Prompt sources by name; each ``fn(name, *, size, seed, params, prompt_column, instruction) -> list[Prompt]``."""
GENERATED_SOURCES: set[str] = set()
"""Sources that generate prompts from a seed (train and eval come from different seeds)."""


def register_prompt_source(name: str, *, generated: bool = False) -> Callable[[Callable[..., list[Prompt]]],
                                                                               Callable[..., list[Prompt]]]:
    """Register a prompt source under ``name`` (``generated``: it makes prompts from a seed)."""

    def deco(fn: Callable[..., list[Prompt]]) -> Callable[..., list[Prompt]]:
        PROMPT_SOURCES.register(name)(fn)
        if generated:
            GENERATED_SOURCES.add(name)
        return fn

    return deco


def load_prompts(source: str, name: str, *, size: int | None = None, seed: int = 0,
                 params: Mapping[str, Any] | None = None, prompt_column: str = "prompt",
                 instruction: str | None = None) -> list[Prompt]:
    """Prompts from the registered ``source``.

    Args:
        source: a key of ``PROMPT_SOURCES`` (reasoning_gym, jsonl, csv, hf_datasets).
        name: the reasoning-gym task name, or the path of the file / dataset directory.
        size: how many prompts (required for reasoning_gym; files: the first ``size`` rows, None = all).
        seed: generator seed (reasoning_gym; files ignore it, their order is the file's).
        params: source parameters: reasoning-gym task parameters, or for files
            ``id_column`` / ``meta_columns`` (and ``split`` for hf_datasets).
        prompt_column: the column holding the prompt text (files).
        instruction: format instruction. Appended on a new line after the prompt; if it contains
            ``{prompt}`` it is a template instead (e.g. a one-shot example before the question).
            None: reasoning_gym uses ``ANSWER_INSTRUCTION``, files use the prompt as it is.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of prompts (or None for a whole file), got {size}")
    return PROMPT_SOURCES.get(source)(name, size=size, seed=seed, params=dict(params or {}),
                                     prompt_column=prompt_column, instruction=instruction)


def apply_instruction(text: str, instruction: str | None) -> str:
    """``text`` with the format ``instruction`` appended (or substituted into it when it has ``{prompt}``)."""
    if not instruction:
        return text
    if "{prompt}" in instruction:
        return instruction.replace("{prompt}", text)
    return f"{text}\n{instruction}"


# ---------------------------------------------------------------------------------------------
# reasoning-gym


def _jsonable(value: Any) -> Any:
    """Params as plain lists/dicts, so that meta survives pickle, JSON and YAML unchanged."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def make_reasoning_gym_dataset(task: str, params: Mapping[str, Any], *, seed: int, size: int) -> Any:
    """``reasoning_gym.create_dataset`` with errors that name the bad task or parameter and list valid ones."""
    import dataclasses

    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; valid tasks: {', '.join(sorted(DATASETS))}")
    for reserved in ("size", "seed"):
        if reserved in params:
            raise ValueError(f"reasoning_gym params must not contain {reserved!r}: pass it as the `{reserved}` "
                             "argument (task.train_size / task.seed in a config)")
    fields = {f.name for f in dataclasses.fields(DATASETS[task][1])} - {"size", "seed"}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"reasoning-gym task {task!r} has no parameter(s) {unknown}; "
                         f"valid parameters: {', '.join(sorted(fields))}")
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **params)
    except AssertionError as e:  # reasoning-gym validates its configs with assert
        raise ValueError(f"invalid parameters {dict(params)} for reasoning-gym task {task!r}: {e}") from e


@register_prompt_source("reasoning_gym", generated=True)
def reasoning_gym_prompts(name: str, *, size: int | None, seed: int, params: dict[str, Any],
                          prompt_column: str, instruction: str | None) -> list[Prompt]:
    """``size`` items of reasoning-gym task ``name``; ids ``name/seed/index``.

    ``meta`` = {task, params, seed, size, index, entry, answer}: enough to re-create the dataset and call
    its verifier ``score_answer(answer, entry)``. ``prompt_column`` is unused (questions are generated).
    """
    if size is None:
        raise ValueError(f"reasoning_gym source: give `size` (how many {name!r} items to generate)")
    params = _jsonable(params)
    dataset = make_reasoning_gym_dataset(name, params, seed=seed, size=size)
    instruction = ANSWER_INSTRUCTION if instruction is None else instruction
    prompts = []
    for index in range(size):
        entry = _jsonable(dataset[index])
        prompts.append(Prompt(
            text=apply_instruction(entry["question"], instruction),
            id=f"{name}/{seed}/{index}",
            meta={"task": name, "params": copy.deepcopy(params), "seed": seed, "size": size, "index": index,
                  "entry": entry, "answer": entry["answer"]},
        ))
    return prompts


# ---------------------------------------------------------------------------------------------
# files

_FILE_PARAMS = {"id_column", "meta_columns"}


def _check_file_params(source: str, params: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{source} source has no parameter(s) {unknown}; "
                         f"valid parameters: {', '.join(sorted(allowed))}")


def rows_to_prompts(rows: Sequence[Mapping[str, Any]], *, label: str, prompt_column: str,
                    instruction: str | None, size: int | None, id_column: str | None = None,
                    meta_columns: Sequence[str] | None = None) -> list[Prompt]:
    """Prompts from table rows: ``prompt_column`` is the text, the other (or ``meta_columns``) go to meta.

    Ids are the ``id_column`` value, else ``label/row_number`` (0-based).
    """
    if not rows:
        raise ValueError(f"{label}: no rows")
    columns = list(rows[0].keys())
    for col, what, holds in ((prompt_column, "prompt_column", "prompt text"), (id_column, "params.id_column", "ids")):
        if col is not None and col not in columns:
            raise ValueError(f"{label}: no column {col!r} ({what}); columns are {columns}. "
                             f"Set {what} to the column that holds the {holds}")
    keep = [c for c in columns if c != prompt_column] if meta_columns is None else list(meta_columns)
    missing = [c for c in keep if c not in columns]
    if missing:
        raise ValueError(f"{label}: params.meta_columns names missing column(s) {missing}; columns are {columns}")
    prompts, seen_ids = [], set()
    for i, row in enumerate(rows[:size] if size is not None else rows):
        text = row.get(prompt_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{label}: row {i} has no prompt text in column {prompt_column!r} (got {text!r})")
        pid = str(row[id_column]) if id_column is not None else f"{label}/{i}"
        if pid in seen_ids:
            raise ValueError(f"{label}: row {i} repeats id {pid!r} from column {id_column!r}; ids must be unique")
        seen_ids.add(pid)
        prompts.append(Prompt(text=apply_instruction(text, instruction), id=pid,
                              meta={c: row.get(c) for c in keep}))
    return prompts


def _existing_path(source: str, path: str, *, file: bool = False) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source} source: no such file or directory {path!r} "
                                "(only local paths are read; nothing is downloaded)")
    if file and not os.path.isfile(path):
        raise ValueError(f"{source} source: {path!r} is a directory; set task.name to the {source} file's path")
    return path


@register_prompt_source("jsonl")
def jsonl_prompts(name: str, *, size: int | None, seed: int, params: dict[str, Any],
                  prompt_column: str, instruction: str | None) -> list[Prompt]:
    """One JSON object per line of file ``name`` (blank lines skipped). Params: id_column, meta_columns."""
    _check_file_params("jsonl", params, _FILE_PARAMS)
    rows = []
    with open(_existing_path("jsonl", name, file=True), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(row, dict):
                raise ValueError(f"{name}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows_to_prompts(rows, label=os.path.basename(name), prompt_column=prompt_column,
                           instruction=instruction, size=size, **params)


@register_prompt_source("csv")
def csv_prompts(name: str, *, size: int | None, seed: int, params: dict[str, Any],
                prompt_column: str, instruction: str | None) -> list[Prompt]:
    """A CSV file with a header row (values are strings). Params: id_column, meta_columns,
    multiline_fields (default false: a quoted field running over several lines is refused as an
    unbalanced quote; true allows it)."""
    _check_file_params("csv", params, _FILE_PARAMS | {"multiline_fields"})
    params = dict(params)
    multiline = params.pop("multiline_fields", False)
    with open(_existing_path("csv", name, file=True), encoding="utf-8", newline="") as f:
        rows = read_csv_rows(f, label=name, multiline_fields=bool(multiline))
    return rows_to_prompts(rows, label=os.path.basename(name), prompt_column=prompt_column,
                           instruction=instruction, size=size, **params)


def read_csv_rows(lines: Iterator[str], *, label: str, multiline_fields: bool = False) -> list[dict[str, str]]:
    """Rows of a CSV with a header, as dicts; malformed rows are refused by line number (1-based).

    A row with more or fewer fields than the header is refused (never padded with None), and so is a
    quoted field that runs over several lines unless ``multiline_fields``: that is what an unbalanced
    quote looks like, silently swallowing the rows after it.  Blank lines are skipped.
    """
    reader = csv.reader(lines, strict=True)
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    end = 0
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue
            if end > start and not multiline_fields:
                raise ValueError(f"{label}:{start}: a quoted field runs from line {start} to line {end}: an "
                                 "unbalanced quote? Close it (a quote inside a field is written \"\"), or set "
                                 "task.params.multiline_fields=true if fields really span lines")
            if header is None:
                header = record
                continue
            if len(record) != len(header):
                raise ValueError(f"{label}:{start}: {len(record)} field(s) where the header has {len(header)} "
                                 f"({', '.join(header)}); fix the row (quote fields that contain a comma)")
            rows.append(dict(zip(header, record)))
    except csv.Error as e:
        raise ValueError(f"{label}:{reader.line_num}: malformed CSV ({e}); fix the quoting there") from e
    return rows


_HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _load_local_hf_dataset(path: str, split: str | None) -> Any:
    import datasets

    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_info.json"))
                                or os.path.exists(os.path.join(path, "dataset_dict.json"))):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                split = "train" if "train" in ds else None
            if split not in ds:
                raise ValueError(f"hf_datasets: {path!r} has splits {list(ds)}; choose one with params.split")
            ds = ds[split]
        return ds
    files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else sorted(glob.glob(path))
    exts = {os.path.splitext(f)[1] for f in files} & set(_HF_FILE_BUILDERS)
    if not files or len(exts) != 1:
        raise ValueError(f"hf_datasets: {path!r} is neither a save_to_disk directory nor files of one kind among "
                         f"{sorted(_HF_FILE_BUILDERS)} (found {[os.path.basename(f) for f in files][:10]})")
    ext = exts.pop()
    files = [f for f in files if f.endswith(ext)]
    return datasets.load_dataset(_HF_FILE_BUILDERS[ext], data_files=files, split=split or "train")


@register_prompt_source("hf_datasets")
def hf_datasets_prompts(name: str, *, size: int | None, seed: int, params: dict[str, Any],
                        prompt_column: str, instruction: str | None) -> list[Prompt]:
    """Local Hugging Face data: a ``save_to_disk`` directory, or parquet/json/jsonl/csv/arrow file(s) (a file,
    a glob or a directory of them). Never contacts the hub. Params: split, id_column, meta_columns."""
    _check_file_params("hf_datasets", params, _FILE_PARAMS | {"split"})
    params = dict(params)
    split = params.pop("split", None)
    if not glob.glob(name):
        _existing_path("hf_datasets", name)
    ds = _load_local_hf_dataset(name, split)
    n = len(ds) if size is None else min(size, len(ds))
    rows = ds.select(range(n)).to_list()
    label = os.path.basename(os.path.normpath(name))
    return rows_to_prompts(rows, label=label, prompt_column=prompt_column, instruction=instruction,
                           size=None, **params)


# ---------------------------------------------------------------------------------------------
# splits


def normalise_prompt_text(text: str) -> str:
    """The key under which two prompts count as the same: case-folded, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def dedupe_prompts(prompts: Sequence[Prompt], *, exclude: Sequence[Prompt] = ()) -> list[Prompt]:
    """``prompts`` without repeats (first kept) and without any prompt whose text is in ``exclude``."""
    seen = {normalise_prompt_text(p.text) for p in exclude}
    out = []
    for p in prompts:
        key = normalise_prompt_text(p.text)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def split_prompts(prompts: Sequence[Prompt], *, eval_size: int | None = None, eval_fraction: float | None = None,
                  seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval): de-duplicate by normalised text, shuffle with ``seed``, take eval from the front.

    Give exactly one of ``eval_size`` (a count) or ``eval_fraction`` (in (0, 1)). The two lists never share
    a prompt text. Train keeps the prompts' original order (the stream shuffles it).
    """
    if (eval_size is None) == (eval_fraction is None):
        raise ValueError("split_prompts: give exactly one of eval_size or eval_fraction")
    unique = dedupe_prompts(prompts)
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        eval_size = max(1, round(eval_fraction * len(unique)))
    assert eval_size is not None
    if not 0 < eval_size < len(unique):
        raise ValueError(f"eval_size={eval_size} leaves no training prompts: there are {len(unique)} distinct prompts "
                         f"({len(prompts) - len(unique)} duplicates removed); lower eval_size")
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:eval_size])
    return ([p for i, p in enumerate(unique) if i not in eval_idx],
            [unique[i] for i in order[:eval_size]])


def train_eval_prompts(source: str, name: str, *, train_size: int | None, eval_size: int, seed: int = 0,
                       params: Mapping[str, Any] | None = None, prompt_column: str = "prompt",
                       instruction: str | None = None) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval) prompts that never share a normalised text.

    Generated sources (reasoning_gym): eval is the first ``eval_size`` distinct items of seed
    ``seed + EVAL_SEED_OFFSET``; train is ``train_size`` items of ``seed``, de-duplicated, minus every eval
    text (so train may come out shorter than ``train_size`` on tasks with few distinct questions).
    Files: all rows, split by ``split_prompts(eval_size=..., seed=seed)``, train cut to ``train_size``.
    """
    kw = dict(params=params, prompt_column=prompt_column, instruction=instruction)
    if source in GENERATED_SOURCES:
        if train_size is None:
            raise ValueError(f"{source}: give train_size (how many training items to generate)")
        eval_seed = (seed + EVAL_SEED_OFFSET) % 2**32
        evals = dedupe_prompts(load_prompts(source, name, size=4 * eval_size, seed=eval_seed, **kw))[:eval_size]
        if len(evals) < eval_size:
            raise ValueError(f"{source} task {name!r} with params {dict(params or {})} gave only {len(evals)} distinct "
                             f"questions in {4 * eval_size} draws; lower eval_size or widen the task parameters")
        train = dedupe_prompts(load_prompts(source, name, size=train_size, seed=seed, **kw), exclude=evals)
    else:
        train, evals = split_prompts(load_prompts(source, name, size=None, seed=seed, **kw),
                                     eval_size=eval_size, seed=seed)
        train = train[:train_size] if train_size is not None else train
    if not train:
        raise ValueError(f"{source} {name!r}: no training prompts left after removing the {len(evals)} eval prompts")
    return train, evals


# ---------------------------------------------------------------------------------------------
# prompt length


OVERLONG = ("error", "truncate", "drop")


def fit_prompts(prompts: Sequence[Prompt], length: Callable[[str], int], limit: int, *,
                overlong: str = "error") -> tuple[list[Prompt], list[str]]:
    """(prompts that fit in ``limit`` tokens, a note per prompt changed), measured by ``length(text)``.

    ``length`` counts the tokens the model will see for a prompt text (chat template included).
    ``overlong``: ``error`` raises naming the first prompt over ``limit``; ``drop`` leaves such prompts
    out; ``truncate`` keeps the longest start of the prompt's text that fits.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}; valid: {', '.join(OVERLONG)}")
    kept, notes = [], []
    for p in prompts:
        n = length(p.text)
        if n <= limit:
            kept.append(p)
            continue
        if overlong == "error":
            raise ValueError(f"prompt {p.id!r} is {n} tokens (chat template included), over the {limit} the model's "
                             "context leaves after sampling.max_new_tokens; shorten it, lower max_new_tokens, or "
                             "set task.overlong_prompts=truncate (or drop)")
        if overlong == "drop":
            notes.append(f"dropped prompt {p.id!r} ({n} tokens > {limit})")
            continue
        lo, hi = 0, len(p.text)  # the longest prefix whose length fits: length grows with the prefix
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if length(p.text[:mid]) <= limit else (lo, mid - 1)
        if lo == 0:
            raise ValueError(f"prompt {p.id!r}: even its empty text is over {limit} tokens with the chat template "
                             "and system prompt; lower sampling.max_new_tokens or shorten sampling.system_prompt")
        kept.append(Prompt(text=p.text[:lo], id=p.id, meta=p.meta))
        notes.append(f"truncated prompt {p.id!r} from {n} tokens to {length(p.text[:lo])}")
    return kept, notes


# ---------------------------------------------------------------------------------------------
# the training stream


class PromptStream(Iterator[Prompt]):
    """Training prompts forever: epoch ``e`` visits every prompt once in a permutation seeded by (seed, e).

    ``state_dict()`` is the position (epoch, index within it); a stream built from the same prompts and
    seed and given ``load_state_dict(state)`` yields exactly the prompts the original would have yielded next.
    """

    def __init__(self, prompts: Sequence[Prompt], *, seed: int = 0) -> None:
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._fingerprint = hashlib.sha256("\x00".join(p.id for p in self.prompts).encode()).hexdigest()[:16]
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"seqpg-prompts/{self.seed}/{epoch}").shuffle(order)
        return order

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> Prompt:
        if self.position == len(self.prompts):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        prompt = self.prompts[self._order[self.position]]
        self.position += 1
        return prompt

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (a training step's distinct prompts)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_prompts": len(self.prompts), "fingerprint": self._fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_prompts", "fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(f"PromptStream.load_state_dict: saved {key}={state.get(key)!r} but this stream has "
                                 f"{mine[key]!r}; resume with the same prompts (task config) and seed as the saved run")
        if not 0 <= state["position"] <= len(self.prompts) or state["epoch"] < 0:
            raise ValueError(f"PromptStream.load_state_dict: position {state['position']} / epoch {state['epoch']} "
                             f"out of range for {len(self.prompts)} prompts")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
