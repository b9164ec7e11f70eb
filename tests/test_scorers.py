"""Scorers and score_batch: exact scores on hand-made completions, errors that name the culprit."""

from __future__ import annotations

import math
import pickle
import re
import warnings

import pytest
import torch

from seqpg.batch import Prompt, RolloutBatch
from seqpg.rewards.scorers import (SCORERS, PerSampleScorer, Scorer, ScorerError, completion_tokens, make_scorer,
                           score_batch)
from seqpg.rewards.tasks import load_prompts

ARITH = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def make_rollout(prompts: list[Prompt], completions: list[str], tokenizer=None) -> RolloutBatch:
    """A rollout whose completion ids are the completions' tokens (char ids when no tokenizer is given)."""
    B = len(completions)
    if tokenizer is not None:
        rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    else:
        rows = [[4 + (ord(ch) % 90) for ch in c] + [2] for c in completions]
    C = max(len(r) for r in rows)
    ids_BC = torch.zeros(B, C, dtype=torch.long)
    mask_BC = torch.zeros(B, C, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids_BC[i, :len(r)] = torch.tensor(r)
        mask_BC[i, :len(r)] = True
    return RolloutBatch(prompts=prompts, completions=completions,
                        prompt_ids_BP=torch.ones(B, 3, dtype=torch.long),
                        prompt_mask_BP=torch.ones(B, 3, dtype=torch.bool),
                        completion_ids_BC=ids_BC, completion_mask_BC=mask_BC,
                        sample_logprobs_BC=torch.zeros(B, C), group_ids_B=torch.arange(B),
                        finished_B=torch.ones(B, dtype=torch.bool))


def P(text="q", pid="p0", **meta) -> Prompt:
    return Prompt(text=text, id=pid, meta=meta)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_has_the_documented_kinds_and_errors_list_valid_ones():
    assert {"reasoning_gym", "vader", "hf_classifier", "callable", "dense_callable", "trl_reward", "exact_match",
            "contains", "length", "format"} <= set(SCORERS)
    with pytest.raises(ValueError, match="unknown scorer kind 'vadr'; valid names: .*vader"):
        make_scorer("vadr")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['feild'\]; it accepts: field"):
        make_scorer("vader", feild="pos")
    with pytest.raises(ValueError, match=r"requires parameter\(s\) \['fn'\]"):
        make_scorer("callable")
    assert make_scorer("vader").name == "vader" and make_scorer("vader", name="joy").name == "joy"


# ---------------------------------------------------------------------------------------------
# reasoning-gym verifier


@pytest.fixture(scope="module")
def arith_prompts():
    return load_prompts("reasoning_gym", "basic_arithmetic", size=4, seed=7, params=ARITH)


def test_reasoning_gym_scores_the_tagged_answer_with_the_task_verifier(arith_prompts):
    scorer = make_scorer("reasoning_gym")
    p = arith_prompts[0]
    ans = p.meta["answer"]
    cases = {
        f"Let me think. <answer>{ans}</answer>": 1.0,
        f"<answer>99</answer> no wait <answer> {ans} </answer>": 1.0,  # the last pair counts, stripped
        f"The answer is {ans}.": 0.0,  # no tags, no score
        f"<answer>{int(ans) + 1}</answer>": 0.0,
        f"<answer>x = {ans}</answer>": len(ans) / len(f"x = {ans}"),  # the verifier's own partial credit
    }
    assert scorer([p] * len(cases), list(cases)) == pytest.approx(list(cases.values()))
    assert [scorer.correct(p, c) for c in cases] == [True, True, False, False, False]
    # a prompt that went through pickle (another process, a resumed run) scores the same
    q = pickle.loads(pickle.dumps(p))
    assert make_scorer("reasoning_gym")([q], [f"<answer>{ans}</answer>"]) == [1.0]


def test_reasoning_gym_scorer_refuses_prompts_without_task_meta():
    with pytest.raises(ValueError, match="prompt 'x' has no reasoning-gym meta"):
        make_scorer("reasoning_gym")([P(pid="x")], ["<answer>1</answer>"])


# ---------------------------------------------------------------------------------------------
# reference answers, shape of the text, sentiment


def test_exact_match_and_contains_with_extraction():
    p = P(answer="Paris")
    texts = ["paris", "  Paris ", "It is Paris.", "<answer>paris</answer>", "I think 12 then 42", "Lyon"]
    assert make_scorer("exact_match")([p] * 6, texts) == [1, 1, 0, 0, 0, 0]
    assert make_scorer("exact_match", extract="answer_tag")([p] * 6, texts) == [0, 0, 0, 1, 0, 0]
    assert make_scorer("contains")([p] * 6, texts) == [1, 1, 1, 1, 0, 0]
    num = P(label="42")
    assert make_scorer("exact_match", column="label", extract="last_number")([num] * 2, texts[4:]) == [1, 0]
    assert make_scorer("exact_match", case_sensitive=True)([p] * 2, texts[:2]) == [0, 1]
    assert make_scorer("contains").correct(p, "It is Paris.") is True
    with pytest.raises(ValueError, match=r"no meta column 'answer' \(meta keys: \['label'\]\)"):
        make_scorer("exact_match")([num], ["42"])
    with pytest.raises(ValueError, match="unknown extract 'tags'"):
        make_scorer("exact_match", extract="tags")


def test_length_and_format():
    p = P()
    assert make_scorer("length")([p, p], ["one two three", ""]) == [3.0, 0.0]
    assert make_scorer("length", unit="chars")([p], ["abcd"]) == [4.0]
    assert make_scorer("length", target=4)([p, p, p], ["a b c d", "a b", "a b c d e f"]) == [0.0, -0.5, -0.5]
    texts = ["<answer>4</answer>", "so <answer>\n4\n</answer> done", "answer: 4", "<answer>4"]
    assert make_scorer("format")([p] * 4, texts) == [1, 1, 0, 0]
    assert make_scorer("format", pattern=r"<answer>-?\d+</answer>", fullmatch=True)([p] * 4, texts) == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="invalid regex pattern"):
        make_scorer("format", pattern="(")


def test_vader_compound_sign_and_range():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["What a wonderful, happy day!", "This is terrible and I hate it.", "The table has four legs."]
    scores = make_scorer("vader")([P()] * 3, texts)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0
    assert scores == [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    assert make_scorer("vader", field="pos")([P()], [texts[0]])[0] > 0.3


# ---------------------------------------------------------------------------------------------
# learned reward model


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A randomly initialised 1-layer BERT classifier (labels bad/good) and char tokenizer, saved locally."""
    import transformers

    from seqpg.model.loading import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("rm")
    tok = build_tiny_tokenizer()
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=128, num_labels=2,
                                  id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1},
                                  pad_token_id=tok.pad_token_id)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(path)
    return str(path)


def test_hf_classifier_scores_match_the_model_one_by_one(tiny_classifier_dir):
    import transformers

    texts = ["good stuff", "a much longer completion about nothing", "x", "hello there, friend"]
    prompts = [P(text=f"prompt {i}") for i in range(4)]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_classifier_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    with torch.no_grad():
        logits = [model(**tok(t, return_tensors="pt")).logits[0] for t in texts]
        pair_logits = [model(**tok(p.text, t, return_tensors="pt")).logits[0] for p, t in zip(prompts, texts)]
    logit = make_scorer("hf_classifier", path=tiny_classifier_dir, batch_size=3)  # batches of 3 then 1, padded
    assert logit(prompts, texts) == pytest.approx([float(l[1]) for l in logits], abs=1e-5)
    bad = make_scorer("hf_classifier", path=tiny_classifier_dir, label="bad", output="prob")
    assert bad(prompts, texts) == pytest.approx([float(l.softmax(-1)[0]) for l in logits], abs=1e-5)
    pair = make_scorer("hf_classifier", path=tiny_classifier_dir, inputs="prompt_completion")
    assert pair(prompts, texts) == pytest.approx([float(l[1]) for l in pair_logits], abs=1e-5)
    assert len({round(x, 6) for x in logit(prompts, texts)}) == 4  # the model does look at the text
    with pytest.raises(ValueError, match=r"has no label 'great'; labels: \['bad', 'good'\]"):
        make_scorer("hf_classifier", path=tiny_classifier_dir, label="great")
    with pytest.raises(FileNotFoundError, match="loads local directories only"):
        make_scorer("hf_classifier", path="someone/reward-model")


# ---------------------------------------------------------------------------------------------
# user functions


def test_callable_from_module_string_file_string_and_object(tmp_path, monkeypatch):
    code = "def reward(prompt, completion, meta):\n    return len(completion) * meta['scale'] + (prompt == 'hi')\n"
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = [P(text="hi", scale=2.0), P(text="yo", scale=0.5)]
    for fn in ("my_rewards:reward", f"{tmp_path / 'my_rewards.py'}:reward",
               lambda prompt, completion, meta: len(completion) * meta["scale"] + (prompt == "hi")):
        assert make_scorer("callable", fn=fn)(prompts, ["abc", "abcd"]) == [7.0, 2.0]
    with pytest.raises(AttributeError, match="module 'my_rewards' has no callable 'rewrd'"):
        make_scorer("callable", fn="my_rewards:rewrd")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        make_scorer("callable", fn="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="'module:function'"):
        make_scorer("callable", fn="my_rewards.reward")


# ---------------------------------------------------------------------------------------------
# score_batch


class Fixed(Scorer):
    """Returns given scores (for hand-computed combinations)."""

    def __init__(self, name, values, dense=False, judge=None):
        super().__init__(name)
        self.values, self.dense = values, dense
        if judge is not None:
            self.has_correctness, self._judge = True, judge

    def __call__(self, prompts, completions, tokens=None):
        return [self.values[c] for c in completions]

    def correct(self, prompt, completion):
        return self._judge[completion]


def test_score_batch_weights_raw_scores_and_correctness_by_hand():
    comps = ["a", "b", "c"]
    rollout = make_rollout([P(pid=f"p{i}") for i in range(3)], comps)
    helpful = Fixed("helpful", {"a": 1.0, "b": 0.5, "c": 0.0}, judge={"a": True, "b": True, "c": False})
    harm = Fixed("harm", {"a": 1.0, "b": 0.0, "c": 0.5}, judge={"a": False, "b": True, "c": True})
    out = score_batch(rollout, [(helpful, 0.8), (harm, -0.2)])
    assert out.rewards_B.tolist() == pytest.approx([0.8 - 0.2, 0.4, -0.1])
    assert out.rewards_B.dtype == torch.float32 and out.rewards_B.shape == (3,)
    assert out.scores["helpful"].tolist() == [1.0, 0.5, 0.0] and out.scores["harm"].tolist() == [1.0, 0.0, 0.5]
    assert out.correct_B.tolist() == [False, True, False]  # AND over the two judges
    assert out.token_rewards_BC is None and out.num_scorer_errors == 0
    assert score_batch(rollout, [(make_scorer("vader"), 1.0)]).correct_B is None


def test_score_batch_with_real_scorers_on_a_reasoning_gym_rollout(arith_prompts):
    p = arith_prompts[1]
    ans = p.meta["answer"]
    comps = [f"<answer>{ans}</answer>", f"{ans}", f"<answer>{int(ans) + 3}</answer>", f"It is <answer>{ans}</answer>"]
    scorers = [(make_scorer("reasoning_gym"), 1.0), (make_scorer("format"), 0.25)]
    out = score_batch(make_rollout([p] * 4, comps), scorers)
    assert out.rewards_B.tolist() == [1.25, 0.0, 0.25, 1.25]
    assert out.correct_B.tolist() == [True, False, False, True]


def test_dense_scorer_fills_token_rewards_on_real_tokens_only(tiny_tokenizer):
    comps = ["ab", "abcd", "b"]
    rollout = make_rollout([P(pid=f"p{i}") for i in range(3)], comps, tokenizer=tiny_tokenizer)
    assert completion_tokens(rollout, tiny_tokenizer) == [["a", "b", "<|im_end|>"], ["a", "b", "c", "d", "<|im_end|>"],
                                                          ["b", "<|im_end|>"]]
    dense = make_scorer("dense_callable", name="is_b",
                        fn=lambda prompt, completion, tokens, meta: [float(t == "b") for t in tokens])
    out = score_batch(rollout, [(dense, 0.5), (make_scorer("length", unit="chars"), 1.0)], tokenizer=tiny_tokenizer)
    expected_BC = torch.tensor([[0, .5, 0, 0, 0], [0, .5, 0, 0, 0], [.5, 0, 0, 0, 0]])
    assert torch.equal(out.token_rewards_BC, expected_BC)
    assert out.scores["is_b"].tolist() == [1.0, 1.0, 1.0]  # raw: sum over the completion's tokens
    assert out.rewards_B.tolist() == [2.0, 4.0, 1.0]  # sequence scorers only
    with pytest.raises(ValueError, match=r"dense scorer\(s\) \['is_b'\] need .* pass tokenizer="):
        score_batch(rollout, [(dense, 1.0)])
    short = make_scorer("dense_callable", fn=lambda prompt, completion, tokens, meta: [1.0])
    with pytest.raises(ScorerError, match="scorer 'dense_callable' on sample 0 .* returned 1 token rewards for 3"):
        score_batch(rollout, [(short, 1.0)], tokenizer=tiny_tokenizer)


class FailsOn(PerSampleScorer):
    """Raises on completions containing 'boom'; counts calls to show the batch is tried first."""

    has_correctness = True

    def __init__(self, name="flaky"):
        super().__init__(name)
        self.calls = 0

    def __call__(self, prompts, completions, tokens=None):
        self.calls += 1
        return super().__call__(prompts, completions, tokens)

    def score_one(self, prompt, completion):
        if "boom" in completion:
            raise RuntimeError("cannot parse")
        return 1.0

    def correct(self, prompt, completion):
        return True


def test_scorer_exception_names_scorer_sample_prompt_and_completion():
    comps = ["fine", "fine too", "this goes boom right here and the rest of a very long completion text"]
    rollout = make_rollout([P(pid=f"task/{i}") for i in range(3)], comps)
    with pytest.raises(ScorerError, match=r"scorer 'flaky' on sample 2 \(prompt id 'task/2', completion starts "
                                          r"'this goes boom.*'\) raised RuntimeError: cannot parse") as info:
        score_batch(rollout, [(FailsOn(), 1.0)])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_on_error_zero_zeroes_only_the_failing_sample_and_counts_it():
    comps = ["boom", "fine", "boom again", "ok"]
    rollout = make_rollout([P(pid=f"p{i}") for i in range(4)], comps)
    scorer = FailsOn()
    out = score_batch(rollout, [(scorer, 2.0), (make_scorer("length"), 1.0)], on_error="zero")
    assert out.scores["flaky"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out.rewards_B.tolist() == [1.0, 3.0, 2.0, 3.0]
    assert out.num_scorer_errors == 2
    assert out.correct_B.tolist() == [False, True, False, True]
    assert scorer.calls == 1 + 4  # one batch call, then one call per sample to find the culprits
    ok = FailsOn()
    score_batch(make_rollout([P()] * 3, ["a", "b", "c"]), [(ok, 1.0)])
    assert ok.calls == 1
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'zero'"):
        score_batch(rollout, [(scorer, 1.0)], on_error="skip")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_even_with_on_error_zero(bad):
    rollout = make_rollout([P(pid="a"), P(pid="b")], ["x", "y"])
    scorer = make_scorer("callable", name="nanny", fn=lambda prompt, completion, meta: bad if completion == "y" else 1)
    with pytest.raises(ScorerError, match=r"scorer 'nanny' on sample 1 \(prompt id 'b'.*non-finite score"):
        score_batch(rollout, [(scorer, 1.0)], on_error="zero")


def test_score_batch_rejects_wrong_lengths_and_duplicate_names():
    rollout = make_rollout([P(), P()], ["x", "y"])

    class Short(Scorer):
        def __call__(self, prompts, completions, tokens=None):
            return [1.0]

    with pytest.raises(ScorerError, match="scorer 'short' returned 1 scores for a batch of 2"):
        score_batch(rollout, [(Short("short"), 1.0)])
    with pytest.raises(ValueError, match=r"distinct names, got \['vader', 'vader'\]"):
        score_batch(rollout, [(make_scorer("vader"), 1.0), (make_scorer("vader"), 0.5)])


def test_reasoning_gym_untagged_whole_gives_the_verifiers_partial_credit():
    from seqpg.rewards.scorers import make_scorer
    from seqpg.rewards.tasks import load_prompts

    prompt = load_prompts("reasoning_gym", "basic_arithmetic", size=1, seed=1,
                          params={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                  "operators": ["+"], "allow_parentheses": False, "allow_negation": False})[0]
    answer = prompt.meta["entry"]["answer"]
    strict = make_scorer("reasoning_gym")
    whole = make_scorer("reasoning_gym", untagged="whole")
    bare, sentence, tagged = answer, f"The result is {answer}", f"so <answer>{answer}</answer>"
    assert strict([prompt] * 3, [bare, sentence, tagged]) == [0.0, 0.0, 1.0]
    scores = whole([prompt] * 3, [bare, sentence, tagged])
    assert scores[0] == 1.0 and scores[2] == 1.0
    assert scores[1] == pytest.approx(len(answer) / len(sentence))  # reasoning-gym's substring credit
    assert whole.correct(prompt, bare) and not whole.correct(prompt, sentence)
    with pytest.raises(ValueError, match="untagged"):
        make_scorer("reasoning_gym", untagged="sometimes")


def test_vader_positive_threshold_defines_correctness_for_evaluation(make_rollout):
    from seqpg.batch import Prompt
    from seqpg.rewards.scorers import make_scorer, score_batch

    plain = make_scorer("vader")
    thresholded = make_scorer("vader", positive_threshold=0.05)
    assert not plain.has_correctness and thresholded.has_correctness
    rollout = make_rollout([[5], [5]], [[6], [6]])
    rollout.completions[:] = ["What a wonderful, lovely day!", "This is terrible and sad."]
    rollout.prompts[:] = [Prompt("x", "0"), Prompt("y", "1")]
    scored = score_batch(rollout, [(thresholded, 1.0)])
    assert scored.correct_B.tolist() == [True, False]
    assert scored.rewards_B[0] > 0.5 and scored.rewards_B[1] < -0.3
    assert score_batch(rollout, [(plain, 1.0)]).correct_B is None


# ---------------------------------------------------------------------------------------------
# trl_reward: functions written exactly as TRL's GRPOTrainer documentation writes them


def reward_len(completions, **kwargs):
    """TRL's quick-start reward (standard format): completions close to 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


def match_answer(prompts, completions, answer, **kwargs):
    """Standard format with an extra dataset column."""
    return [1.0 if completion.strip() == str(ref) else 0.0 for completion, ref in zip(completions, answer)]


def format_reward_func(completions, **kwargs):
    """TRL's conversational-format example: completions are lists of one assistant message."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content) else 0.0 for content in completion_contents]


def math_reward(completions, task, **kwargs):
    """Multi-task: None where the sample is not a math sample."""
    return [None if t != "math" else float("4" in c) for c, t in zip(completions, task)]


def code_reward(completions, task, **kwargs):
    return [None if t != "code" else float("def" in c) for c, t in zip(completions, task)]


class Recorder:
    """Records every call's keyword arguments, then delegates."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.fn(**kwargs)


def test_trl_reward_plain_format_passes_strings_ids_and_columns_once_per_batch():
    prompts = [P("What is 2+2?", pid="a", answer="4", source="gsm"), P("Say hi", pid="b", answer="hi")]
    rollout = make_rollout(prompts, ["4", "hello there"])
    rec = Recorder(match_answer)
    out = score_batch(rollout, [(make_scorer("trl_reward", name="match", fn=rec), 1.0),
                                (make_scorer("trl_reward", name="len", fn=reward_len), 0.5)])
    assert len(rec.calls) == 1  # the whole batch in one call
    kw = rec.calls[0]
    assert kw["prompts"] == ["What is 2+2?", "Say hi"] and kw["completions"] == ["4", "hello there"]
    assert kw["answer"] == ["4", "hi"] and kw["source"] == ["gsm", None]  # a missing column is None
    assert kw["trainer_state"] is None
    assert kw["completion_ids"] == [row[mask].tolist() for row, mask in
                                    zip(rollout.completion_ids_BC, rollout.completion_mask_BC)]
    assert kw["completion_ids"][0][-1] == 2  # EOS included, as in TRL's completion_mask
    assert out.scores["match"].tolist() == [1.0, 0.0]
    assert out.scores["len"].tolist() == [-19.0, -9.0]
    assert out.rewards_B.tolist() == [1.0 - 9.5, -4.5]
    assert out.applies["match"].all() and out.correct_B is None


def test_trl_reward_conversational_format_passes_message_lists():
    rollout = make_rollout([P("Solve 2+2", pid="a"), P("Solve 3+3", pid="b")],
                           ["<think>2 and 2</think><answer>4</answer>", "6"])
    rec = Recorder(format_reward_func)
    out = score_batch(rollout, [(make_scorer("trl_reward", name="fmt", fn=rec, conversational=True), 1.0)])
    assert out.scores["fmt"].tolist() == [1.0, 0.0]
    kw = rec.calls[0]
    assert kw["prompts"] == [[{"role": "user", "content": "Solve 2+2"}], [{"role": "user", "content": "Solve 3+3"}]]
    assert kw["completions"][1] == [{"role": "assistant", "content": "6"}]
    with pytest.raises(ValueError, match="conversational must be true or false"):
        make_scorer("trl_reward", fn=reward_len, conversational="yes")


def test_trl_reward_none_is_left_out_of_the_weighted_sum_as_trl_does():
    from seqpg.rewards.scorers import reward_metrics, sample_scores

    tasks = ["math", "code", "math", "code"]
    comps = ["4", "def f(): pass", "5", "print(1)"]
    rollout = make_rollout([P(pid=f"p{i}", task=t) for i, t in enumerate(tasks)], comps)
    scorers = [(make_scorer("trl_reward", name="math", fn=math_reward), 2.0),
               (make_scorer("trl_reward", name="code", fn=code_reward), 0.5)]
    out = score_batch(rollout, scorers)
    # TRL: rewards_per_func = [[1, nan], [nan, 1], [0, nan], [nan, 0]]; (rewards_per_func * w).nansum(dim=1)
    assert out.rewards_B.tolist() == [2.0, 0.5, 0.0, 0.0]
    assert out.applies["math"].tolist() == [True, False, True, False]
    m = reward_metrics(out)
    assert m["reward/math"] == 0.5 and m["reward/code"] == 0.5  # TRL's nanmean: over the samples it applied to
    assert m["reward_none/math"] == 0.5 and m["reward_unscored"] == 0.0
    assert sample_scores(out, 1) == {"math": None, "code": 1.0}
    # a sample no function applies to gets 0, with TRL's warning
    rollout = make_rollout([P(pid="m", task="math"), P(pid="x", task="poetry")], ["4", "roses"])
    with pytest.warns(UserWarning, match=r"every scorer \(math, code\) returned None for 1 of 2 .* prompt id 'x'"):
        out = score_batch(rollout, scorers)
    assert out.rewards_B.tolist() == [2.0, 0.0]
    assert reward_metrics(out)["reward_unscored"] == 0.5
    # beside a scorer that always applies there is nothing to warn about, and no unscored fraction
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = score_batch(rollout, scorers + [(make_scorer("length", unit="chars"), 1.0)])
    assert out.rewards_B.tolist() == [3.0, 5.0] and "reward_unscored" not in reward_metrics(out)


def test_trl_reward_bad_output_gets_seqpgs_clear_errors():
    rollout = make_rollout([P(pid="a", task="math"), P(pid="b", task="math")], ["x", "y"])
    with pytest.raises(ScorerError, match="scorer 'short' returned 1 scores for a batch of 2"):
        score_batch(rollout, [(make_scorer("trl_reward", name="short", fn=lambda completions, **kw: [1.0]), 1.0)])
    words = make_scorer("trl_reward", name="words", fn=lambda completions, **kw: ["good" for _ in completions])
    with pytest.raises(ScorerError, match=r"scorer .words. on sample 0 \(prompt id .a.* returned .good. \(str\), not a number"):
        score_batch(rollout, [(words, 1.0)])

    def fails_on_y(completions, **kwargs):
        if "y" in completions:
            raise KeyError("no parse")
        return [1.0] * len(completions)

    with pytest.raises(ScorerError, match=r"scorer 'trl_reward' on sample 1 \(prompt id 'b'.* raised KeyError"):
        score_batch(rollout, [(make_scorer("trl_reward", fn=fails_on_y), 1.0)])
    out = score_batch(rollout, [(make_scorer("trl_reward", fn=fails_on_y), 1.0)], on_error="zero")
    assert out.scores["trl_reward"].tolist() == [1.0, 0.0] and out.num_scorer_errors == 1
    nan = make_scorer("trl_reward", name="nan", fn=lambda completions, **kw: [math.nan] * len(completions))
    with pytest.raises(ScorerError, match="non-finite score"):
        score_batch(rollout, [(nan, 1.0)])
    clash = make_rollout([P(pid="a", completions="?")], ["x"])
    with pytest.raises(ScorerError, match=r"prompt column\(s\) \['completions'\] share a name with an argument TRL"):
        score_batch(clash, [(make_scorer("trl_reward", fn=reward_len), 1.0)])
    # only scorers of this kind may say None
    none = make_scorer("callable", name="nothing", fn=lambda prompt, completion, meta: None)
    with pytest.raises(ScorerError, match="returned None, not a number .only a trl_reward scorer may return None"):
        score_batch(rollout, [(none, 1.0)])


def test_trl_reward_loads_a_function_from_a_file_path(tmp_path):
    path = tmp_path / "my_trl_rewards.py"
    path.write_text("def reward_len(completions, **kwargs):\n"
                    "    return [-abs(20 - len(completion)) for completion in completions]\n")
    scorer = make_scorer("trl_reward", fn=f"{path}:reward_len")
    out = score_batch(make_rollout([P()], ["x" * 18]), [(scorer, 1.0)])
    assert out.rewards_B.tolist() == [-2.0]
