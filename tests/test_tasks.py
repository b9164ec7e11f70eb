"""Prompt sources, splits and the resumable prompt stream."""

from __future__ import annotations

import json
import pickle

import pytest

from seqpg.batch import Prompt
from seqpg.rewards.tasks import (ANSWER_INSTRUCTION, PROMPT_SOURCES, PromptStream, apply_instruction, load_prompts,
                         make_reasoning_gym_dataset, normalise_prompt_text, split_prompts, train_eval_prompts)

ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
# 1-digit a+b / a-b without negation or parentheses: only 11 * 11 * 2 = 242 distinct questions
TINY_ARITH = {**ARITH, "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}


def test_registry_lists_the_sources_and_unknown_names_list_valid_ones():
    assert {"reasoning_gym", "jsonl", "csv", "hf_datasets"} <= set(PROMPT_SOURCES)
    valid = "csv, hf_datasets, jsonl, reasoning_gym"
    with pytest.raises(ValueError, match=f"unknown prompt source 'yaml'; valid names: {valid}"):
        load_prompts("yaml", "x.yaml")


# ---------------------------------------------------------------------------------------------
# reasoning-gym


def test_reasoning_gym_prompts_carry_question_instruction_ids_and_verifiable_meta():
    prompts = load_prompts("reasoning_gym", "basic_arithmetic", size=5, seed=3, params=ARITH)
    assert [p.id for p in prompts] == [f"basic_arithmetic/3/{i}" for i in range(5)]
    for i, p in enumerate(prompts):
        entry = p.meta["entry"]
        assert p.text == f"{entry['question']}\n{ANSWER_INSTRUCTION}"
        assert "<answer></answer>" in p.text
        assert p.meta["answer"] == entry["answer"]
        assert (p.meta["task"], p.meta["seed"], p.meta["index"]) == ("basic_arithmetic", 3, i)
    # meta survives pickling and JSON, and re-creates the dataset whose verifier accepts the answer
    for p in (pickle.loads(pickle.dumps(prompts[2])), Prompt(**json.loads(json.dumps(prompts[2].__dict__)))):
        ds = make_reasoning_gym_dataset(p.meta["task"], p.meta["params"], seed=p.meta["seed"], size=p.meta["size"])
        assert json.loads(json.dumps(ds[p.meta["index"]])) == p.meta["entry"]  # tuples are stored as lists
        assert ds.score_answer(p.meta["answer"], p.meta["entry"]) == 1.0


def test_reasoning_gym_is_deterministic_in_the_seed():
    a = load_prompts("reasoning_gym", "basic_arithmetic", size=20, seed=1, params=ARITH)
    b = load_prompts("reasoning_gym", "basic_arithmetic", size=20, seed=1, params=ARITH)
    c = load_prompts("reasoning_gym", "basic_arithmetic", size=20, seed=1000, params=ARITH)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in c]


def test_instruction_is_appended_or_used_as_a_template():
    q = load_prompts("reasoning_gym", "basic_arithmetic", size=1, seed=0, params=ARITH)[0].meta["entry"]["question"]
    plain = load_prompts("reasoning_gym", "basic_arithmetic", size=1, seed=0, params=ARITH, instruction="")[0]
    appended = load_prompts("reasoning_gym", "basic_arithmetic", size=1, seed=0, params=ARITH,
                            instruction="Be brief.")[0]
    shot = load_prompts("reasoning_gym", "basic_arithmetic", size=1, seed=0, params=ARITH,
                        instruction="Example: 1 + 1 -> <answer>2</answer>\n{prompt}")[0]
    assert plain.text == q
    assert appended.text == f"{q}\nBe brief."
    assert shot.text == f"Example: 1 + 1 -> <answer>2</answer>\n{q}"
    assert apply_instruction("x {y}", "{prompt} {z}") == "x {y} {z}"  # braces elsewhere are left alone


def test_reasoning_gym_errors_name_the_bad_input():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'basic_arithmetc'.*basic_arithmetic"):
        load_prompts("reasoning_gym", "basic_arithmetc", size=2)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['max_term'\].*max_terms"):
        load_prompts("reasoning_gym", "basic_arithmetic", size=2, params={"max_term": 2})
    with pytest.raises(ValueError, match="must not contain 'seed'"):
        load_prompts("reasoning_gym", "basic_arithmetic", size=2, params={"seed": 2})
    with pytest.raises(ValueError, match="give `size`"):
        load_prompts("reasoning_gym", "basic_arithmetic")
    with pytest.raises(ValueError, match="invalid parameters.*max_terms must be >= min_terms"):
        load_prompts("reasoning_gym", "basic_arithmetic", size=2, params={"min_terms": 3, "max_terms": 2})


# ---------------------------------------------------------------------------------------------
# files


ROWS = [{"question": "What is 2+2?", "answer": "4", "level": 1},
        {"question": "Capital of France?", "answer": "Paris", "level": 2},
        {"question": "Colour of the sky?", "answer": "blue", "level": 1}]


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    return str(path)


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "qa.csv"
    lines = [f"\"{r['question']}\",{r['answer']},{r['level']}\n" for r in ROWS]
    path.write_text("question,answer,level\n" + "".join(lines))
    return str(path)


def test_jsonl_prompt_column_and_meta_columns(jsonl_file):
    prompts = load_prompts("jsonl", jsonl_file, prompt_column="question")
    assert [p.text for p in prompts] == [r["question"] for r in ROWS]
    assert [p.id for p in prompts] == ["qa.jsonl/0", "qa.jsonl/1", "qa.jsonl/2"]
    assert prompts[1].meta == {"answer": "Paris", "level": 2}
    only = load_prompts("jsonl", jsonl_file, size=2, prompt_column="question",
                        params={"meta_columns": ["answer"], "id_column": "answer"}, instruction="Answer briefly.")
    assert [(p.id, p.text, p.meta) for p in only] == [
        ("4", "What is 2+2?\nAnswer briefly.", {"answer": "4"}),
        ("Paris", "Capital of France?\nAnswer briefly.", {"answer": "Paris"})]


def test_csv_reads_like_jsonl_with_string_values(csv_file):
    prompts = load_prompts("csv", csv_file, prompt_column="question")
    assert [p.text for p in prompts] == [r["question"] for r in ROWS]
    assert prompts[0].meta == {"answer": "4", "level": "1"}


def test_file_errors_name_the_file_the_column_and_the_fix(jsonl_file, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'prompt' \(prompt_column\); "
                                         r"columns are \['question', 'answer', 'level'\]"):
        load_prompts("jsonl", jsonl_file)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['colum'\]; valid parameters: id_column, meta_columns"):
        load_prompts("jsonl", jsonl_file, prompt_column="question", params={"colum": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts("jsonl", str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(ValueError, match="row 1 has no prompt text in column 'prompt'"):
        load_prompts("jsonl", str(empty))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_prompts("csv", str(tmp_path / "missing.csv"))


def test_hf_datasets_reads_save_to_disk_dirs_and_data_files_but_never_the_hub(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in ROWS])
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    ds.to_json(str(tmp_path / "qa.json"))
    expected = [(r["question"], {"answer": r["answer"]}) for r in ROWS]
    for name in ("saved", "dict", "qa.parquet", "qa.json"):
        prompts = load_prompts("hf_datasets", str(tmp_path / name))
        assert [(p.text, p.meta) for p in prompts] == expected, name
    test_split = load_prompts("hf_datasets", str(tmp_path / "dict"), params={"split": "test"})
    assert [p.text for p in test_split] == [ROWS[0]["question"]]
    assert len(load_prompts("hf_datasets", str(tmp_path / "qa.parquet"), size=2)) == 2
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]"):
        load_prompts("hf_datasets", str(tmp_path / "dict"), params={"split": "validation"})
    with pytest.raises(FileNotFoundError, match="only local paths"):
        load_prompts("hf_datasets", "openai/gsm8k")


# ---------------------------------------------------------------------------------------------
# splits


def _texts(prompts):
    return {normalise_prompt_text(p.text) for p in prompts}


def test_split_never_overlaps_even_with_duplicates_differing_in_case_and_spaces():
    base = [f"Question number {i}?" for i in range(40)]
    variants = [t.upper() for t in base[:15]] + ["  " + t.replace(" ", "\n  ") for t in base[10:30]]
    prompts = [Prompt(text=t, id=str(i)) for i, t in enumerate(base + variants)]
    for seed in range(5):
        train, evals = split_prompts(prompts, eval_size=10, seed=seed)
        assert len(evals) == 10 and len(train) == 30
        assert not _texts(train) & _texts(evals)
        assert _texts(train) | _texts(evals) == _texts(prompts)
    frac_train, frac_eval = split_prompts(prompts, eval_fraction=0.25, seed=0)
    assert len(frac_eval) == 10 and len(frac_train) == 30


def test_split_is_seeded():
    prompts = [Prompt(text=f"p{i}", id=str(i)) for i in range(50)]
    assert split_prompts(prompts, eval_size=5, seed=1) == split_prompts(prompts, eval_size=5, seed=1)
    assert split_prompts(prompts, eval_size=5, seed=1)[1] != split_prompts(prompts, eval_size=5, seed=2)[1]


def test_split_argument_errors():
    prompts = [Prompt(text=t, id=str(i)) for i, t in enumerate(["a", "A", "b", "c"])]
    with pytest.raises(ValueError, match="exactly one of eval_size or eval_fraction"):
        split_prompts(prompts, eval_size=1, eval_fraction=0.5)
    with pytest.raises(ValueError, match=r"there are 3 distinct prompts \(1 duplicates removed\)"):
        split_prompts(prompts, eval_size=3)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_prompts(prompts, eval_fraction=1.0)


def test_reasoning_gym_train_and_eval_come_from_different_seeds_and_never_overlap():
    train, evals = train_eval_prompts("reasoning_gym", "basic_arithmetic", train_size=400, eval_size=40, seed=0,
                                      params=TINY_ARITH)
    assert len(evals) == 40 and len(_texts(evals)) == 40
    assert {p.meta["seed"] for p in evals} != {p.meta["seed"] for p in train}
    assert not _texts(train) & _texts(evals)
    # the task has only 242 distinct questions, so the raw training draw does repeat eval questions:
    raw = load_prompts("reasoning_gym", "basic_arithmetic", size=400, seed=0, params=TINY_ARITH)
    assert _texts(raw) & _texts(evals)
    assert len(train) == len(_texts(raw) - _texts(evals))


def test_train_eval_prompts_for_files_and_too_small_tasks(jsonl_file):
    train, evals = train_eval_prompts("jsonl", jsonl_file, train_size=None, eval_size=1, prompt_column="question")
    assert len(train) == 2 and len(evals) == 1 and not _texts(train) & _texts(evals)
    with pytest.raises(ValueError, match="gave only .* distinct questions"):
        train_eval_prompts("reasoning_gym", "basic_arithmetic", train_size=10, eval_size=300, params=TINY_ARITH)


# ---------------------------------------------------------------------------------------------
# stream


PROMPTS = [Prompt(text=f"prompt {i}", id=f"p{i}") for i in range(7)]


def test_stream_visits_every_prompt_once_per_epoch_in_a_fresh_order():
    stream = PromptStream(PROMPTS, seed=0)
    epochs = [[p.id for p in stream.take(7)] for _ in range(4)]
    for order in epochs:
        assert sorted(order) == sorted(p.id for p in PROMPTS)
    assert len({tuple(o) for o in epochs}) > 1
    assert [p.id for p in PromptStream(PROMPTS, seed=0).take(28)] == sum(epochs, [])
    assert [p.id for p in PromptStream(PROMPTS, seed=1).take(28)] != sum(epochs, [])


@pytest.mark.parametrize("stop_at", [0, 3, 7, 10, 14])
def test_resumed_stream_continues_with_exactly_the_same_prompts(stop_at):
    reference = [p.id for p in PromptStream(PROMPTS, seed=5).take(stop_at + 20)]
    first = PromptStream(PROMPTS, seed=5)
    first.take(stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = PromptStream(list(PROMPTS), seed=5)
    resumed.load_state_dict(state)
    assert [p.id for p in resumed.take(20)] == reference[stop_at:]


def test_stream_refuses_state_of_other_prompts_or_seed():
    state = PromptStream(PROMPTS, seed=5).state_dict()
    with pytest.raises(ValueError, match="saved seed=5 but this stream has 6"):
        PromptStream(PROMPTS, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="saved num_prompts=7"):
        PromptStream(PROMPTS[:6], seed=5).load_state_dict(state)
    renamed = [Prompt(text=p.text, id=p.id + "x") for p in PROMPTS]
    with pytest.raises(ValueError, match="saved fingerprint"):
        PromptStream(renamed, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([])
