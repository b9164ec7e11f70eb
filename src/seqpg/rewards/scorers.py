"""Scorers: rewards for completions, and ``score_batch`` that turns a rollout into a scored batch.

A scorer is called on a whole batch, ``scorer(prompts, completions, tokens) -> list``:

* sequence scorers (``dense = False``) return one float per completion;
* dense scorers (``dense = True``) return, per completion, one float per completion token (``tokens[i]``
  are the decoded token strings of completion ``i``, EOS included).

Scorers with a notion of correctness (verifiers, exact match) set ``has_correctness = True`` and answer
``correct(prompt, completion)``. Scorers that judge one sample at a time subclass ``PerSampleScorer`` and
implement ``score_one``; everything expensive (a verifier's dataset, VADER's lexicon, a model) is built
once, so the batch loop costs only the per-sample work.

Kinds (``SCORERS``), all built as ``make_scorer(kind, name=None, **params)``: reasoning_gym, vader,
hf_classifier, callable, dense_callable, trl_reward, exact_match, contains, length, format.

``score_batch`` combines the scorers' raw scores with their weights through
``seqpg.core.rewards.combine_rewards``: sequence scores into ``rewards_B``, dense scores into
``token_rewards_BC``. It refuses non-finite scores, and attributes a scorer's exception to one sample.

None: a scorer that sets ``may_abstain`` (``trl_reward``) may score a sample ``None``, "does not apply to
this sample". Such a score is left out of the weighted sum, i.e. counts 0 in it, as TRL's ``nansum`` does
(see ``TRLRewardScorer``); ``ScoredBatch.applies`` records where, and ``reward_metrics`` averages a scorer
over the samples it applied to and logs the fraction of None.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from seqpg.batch import Prompt, RolloutBatch, ScoredBatch
from seqpg.core.registry import Registry
from seqpg.core.rewards import combine_rewards
from seqpg.devices import resolve_device


class ScorerError(RuntimeError):
    """A scorer raised, or returned something unusable, on a given sample."""


class Scorer(ABC):
    """Base of all scorers: ``name``, ``dense``, ``__call__``, and optionally correctness."""

    name: str
    dense: bool = False
    has_correctness: bool = False
    may_abstain: bool = False
    """Scores may be None, "does not apply to this sample" (left out of the weighted sum)."""
    uses_completion_ids: bool = False
    """``__call__`` also takes ``completion_ids=``: each completion's token ids (EOS included)."""
    uses_episodes: bool = False
    """``__call__`` also takes ``episodes=``: each sample's whole :class:`~seqpg.rollout.episodes.Episode`
    (messages, turns with their tool calls and results, the environment instance), or None in a single-turn run."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None) -> list[float] | list[list[float]]:
        """Scores of ``completions[i]`` given ``prompts[i]`` (dense: per token of ``tokens[i]``)."""

    def correct(self, prompt: Prompt, completion: str) -> bool:
        """Whether ``completion`` solves ``prompt`` (only where ``has_correctness``)."""
        raise TypeError(f"scorer {self.name!r} ({type(self).__name__}) has no notion of correctness")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PerSampleScorer(Scorer):
    """A sequence scorer defined one sample at a time by ``score_one(prompt, completion) -> float``."""

    @abstractmethod
    def score_one(self, prompt: Prompt, completion: str) -> float:
        """The score of one completion."""

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None) -> list[float]:
        score_one = self.score_one
        return [score_one(p, c) for p, c in zip(prompts, completions, strict=True)]


SCORERS = Registry("scorer kind", positional=("name",))
"""Scorer classes by kind; each built as ``cls(name, **params)`` with keyword-only params."""


def register_scorer(kind: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Register a scorer class under ``kind`` (its ``__init__`` takes ``name``, then keyword-only params)."""
    return SCORERS.register(kind)


def make_scorer(kind: str, name: str | None = None, **params: Any) -> Scorer:
    """A scorer of registered ``kind``, called ``name`` (default: the kind) in logs and scores.

    Unknown kinds list the valid ones; unknown or missing ``params`` name what the kind accepts.
    """
    SCORERS.check_params(kind, params)
    return SCORERS.get(kind)(name or kind, **params)


def extract_tagged(completion: str, tag: str = "answer") -> str | None:
    """The last ``<tag>...</tag>`` content (reasoning-gym's own extraction), None when there is none."""
    from reasoning_gym.utils import extract_answer

    return extract_answer(completion, tag_name=tag)


# ---------------------------------------------------------------------------------------------
# verifiers and references


@register_scorer("reasoning_gym")
class ReasoningGymScorer(PerSampleScorer):
    """The task's own verifier, ``dataset.score_answer(answer, entry)``, on the text inside the last
    ``<tag></tag>`` pair of the completion. Correct means a score of exactly 1.

    ``untagged`` decides what a completion without a tag pair gets: ``zero`` (reasoning-gym's own
    convention) or ``whole``: the verifier judges the whole stripped completion as the answer. Most
    verifiers give partial credit there (``basic_arithmetic``: len(answer) / len(completion) when the
    answer is a substring), so a short completion holding the right number earns more than a long one.

    Needs prompts from the ``reasoning_gym`` source (their meta re-creates the dataset, cached).
    """

    has_correctness = True
    UNTAGGED = ("zero", "whole")

    def __init__(self, name: str, *, tag: str = "answer", untagged: str = "zero") -> None:
        super().__init__(name)
        if untagged not in self.UNTAGGED:
            raise ValueError(f"scorer {name!r}: untagged={untagged!r}; valid: {', '.join(self.UNTAGGED)}")
        self.tag, self.untagged = tag, untagged
        self._datasets: dict[tuple[str, str, int], Any] = {}

    def _dataset(self, prompt: Prompt) -> Any:
        from seqpg.rewards.tasks import make_reasoning_gym_dataset

        meta = prompt.meta
        if "task" not in meta or "entry" not in meta:
            raise ValueError(f"prompt {prompt.id!r} has no reasoning-gym meta (task, entry); the reasoning_gym scorer "
                             "needs prompts from the reasoning_gym source")
        key = (meta["task"], repr(sorted(meta.get("params", {}).items())), int(meta.get("seed", 0)))
        if key not in self._datasets:
            self._datasets[key] = make_reasoning_gym_dataset(meta["task"], meta.get("params", {}),
                                                             seed=key[2], size=int(meta.get("size", 1)))
        return self._datasets[key]

    def score_one(self, prompt: Prompt, completion: str) -> float:
        answer = extract_tagged(completion, self.tag)
        if answer is None:
            if self.untagged == "zero" or not completion.strip():
                return 0.0
            answer = completion.strip()
        return float(self._dataset(prompt).score_answer(answer, prompt.meta["entry"]))

    def correct(self, prompt: Prompt, completion: str) -> bool:
        return self.score_one(prompt, completion) == 1.0


_EXTRACTORS = ("none", "answer_tag", "last_number", "last_line")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _extract(completion: str, how: str) -> str | None:
    if how == "none":
        return completion
    if how == "answer_tag":
        return extract_tagged(completion)
    if how == "last_number":
        found = _NUMBER.findall(completion)
        return found[-1] if found else None
    lines = [ln for ln in completion.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _norm(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


class _ReferenceScorer(PerSampleScorer):
    """Compares the completion (or what ``extract`` takes from it) with ``prompt.meta[column]``."""

    has_correctness = True

    def __init__(self, name: str, *, column: str = "answer", extract: str = "none",
                 case_sensitive: bool = False) -> None:
        super().__init__(name)
        if extract not in _EXTRACTORS:
            raise ValueError(f"scorer {name!r}: unknown extract {extract!r}; valid: {', '.join(_EXTRACTORS)}")
        self.column, self.extract, self.case_sensitive = column, extract, case_sensitive

    def _pair(self, prompt: Prompt, completion: str) -> tuple[str, str | None]:
        if self.column not in prompt.meta:
            raise ValueError(f"prompt {prompt.id!r} has no meta column {self.column!r} (meta keys: "
                             f"{sorted(prompt.meta)}); set the scorer's `column` param or add the column to the file")
        got = _extract(completion, self.extract)
        ref = _norm(str(prompt.meta[self.column]), self.case_sensitive)
        return ref, None if got is None else _norm(got, self.case_sensitive)

    def correct(self, prompt: Prompt, completion: str) -> bool:
        return self.score_one(prompt, completion) == 1.0


@register_scorer("exact_match")
class ExactMatchScorer(_ReferenceScorer):
    """1 when the (extracted) completion equals ``meta[column]`` up to case and whitespace, else 0."""

    def score_one(self, prompt: Prompt, completion: str) -> float:
        ref, got = self._pair(prompt, completion)
        return float(got == ref)


@register_scorer("contains")
class ContainsScorer(_ReferenceScorer):
    """1 when ``meta[column]`` occurs in the (extracted) completion up to case and whitespace, else 0."""

    def score_one(self, prompt: Prompt, completion: str) -> float:
        ref, got = self._pair(prompt, completion)
        return float(got is not None and ref in got)


# ---------------------------------------------------------------------------------------------
# sentiment and learned reward models


@register_scorer("vader")
class VaderScorer(PerSampleScorer):
    """VADER sentiment of the completion (Hutto & Gilbert, 2014): ``compound`` in [-1, 1] by default,
    or its ``pos`` / ``neg`` / ``neu`` proportion.

    With ``positive_threshold`` (VADER's authors classify compound >= 0.05 as positive) the scorer
    defines correctness: a completion is "correct" when its score reaches the threshold, so evaluation
    reports the positive rate as accuracy."""

    FIELDS = ("compound", "pos", "neg", "neu")

    def __init__(self, name: str, *, field: str = "compound", positive_threshold: float | None = None) -> None:
        super().__init__(name)
        if field not in self.FIELDS:
            raise ValueError(f"scorer {name!r}: unknown VADER field {field!r}; valid: {', '.join(self.FIELDS)}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.field = field
        self.threshold = positive_threshold
        self.has_correctness = positive_threshold is not None
        self._analyzer = SentimentIntensityAnalyzer()

    def correct(self, prompt: Prompt, completion: str) -> bool:
        if self.threshold is None:
            raise ValueError(f"scorer {self.name!r}: correctness needs positive_threshold")
        return self.score_one(prompt, completion) >= self.threshold

    def score_one(self, prompt: Prompt, completion: str) -> float:
        return float(self._analyzer.polarity_scores(completion)[self.field])


@register_scorer("hf_classifier")
class HFClassifierScorer(Scorer):
    """A local Hugging Face sequence-classification reward model: the logit (or softmax probability;
    sigmoid for single-output heads) of ``label`` (an index or a label name), batched, without gradients.

    ``inputs``: ``completion`` scores the completion alone, ``prompt_completion`` scores the pair.
    ``device``: ``auto`` (this process's GPU when one is visible, else the CPU), ``cuda`` or ``cpu``.
    """

    OUTPUTS = ("logit", "prob")
    INPUTS = ("completion", "prompt_completion")

    def __init__(self, name: str, *, path: str, label: int | str | None = None, output: str = "logit",
                 inputs: str = "completion", batch_size: int = 16, max_length: int = 512,
                 device: str = "auto") -> None:
        super().__init__(name)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = resolve_device(device)  # auto: this process's GPU if any

        if output not in self.OUTPUTS or inputs not in self.INPUTS:
            raise ValueError(f"scorer {name!r}: output must be one of {self.OUTPUTS} and inputs one of {self.INPUTS}, "
                             f"got output={output!r}, inputs={inputs!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"scorer {name!r}: no model directory {path!r} (hf_classifier loads local "
                                    "directories only, e.g. one written by save_pretrained)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "right"  # absolute-position encoders need it; last-token heads handle it
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"scorer {name!r}: the tokenizer in {path!r} has neither a pad nor an EOS token; "
                                 "set tokenizer.pad_token and save it again")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = self.model.config.num_labels
        label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
        if label is None:
            label = 1 if num_labels > 1 else 0
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in label2id:
                raise ValueError(f"scorer {name!r}: model {path!r} has no label {label!r}; labels: {sorted(label2id)}")
            label = label2id[label]
        label = int(label)
        if not 0 <= label < num_labels:
            raise ValueError(f"scorer {name!r}: label index {label} out of range for {num_labels} labels")
        self.label, self.output, self.inputs = label, output, inputs
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(completions), self.batch_size):
            texts = list(completions[i:i + self.batch_size])
            pair = [p.text for p in prompts[i:i + self.batch_size]] if self.inputs == "prompt_completion" else None
            enc = self.tokenizer(*((pair, texts) if pair else (texts,)), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            logits_bL = self.model(**enc).logits.float()  # (b, num_labels)
            if self.output == "logit":
                out_b = logits_bL[:, self.label]
            elif logits_bL.shape[1] == 1:
                out_b = torch.sigmoid(logits_bL[:, 0])
            else:
                out_b = logits_bL.softmax(dim=-1)[:, self.label]
            scores.extend(out_b.tolist())
        return scores


# ---------------------------------------------------------------------------------------------
# user functions


def resolve_callable(fn: str | Callable[..., Any], *, what: str) -> Callable[..., Any]:
    """A callable from ``"module:function"``, ``"path/to/file.py:function"``, or the callable itself."""
    if callable(fn):
        return fn
    if not isinstance(fn, str) or ":" not in fn:
        raise ValueError(f"{what}: fn must be a callable or 'module:function' (or 'file.py:function'), got {fn!r}")
    target, _, attr = fn.rpartition(":")
    if target.endswith(".py"):
        if not os.path.exists(target):
            raise FileNotFoundError(f"{what}: no file {target!r} (from fn={fn!r})")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # runs the file's code, as importing a module does
        except Exception as e:
            raise ImportError(f"{what}: running {target!r} (from fn={fn!r}) raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # ImportError, or whatever the module's own code raised on import
            raise ImportError(f"{what}: cannot import module {target!r} (from fn={fn!r}): "
                              f"{type(e).__name__}: {e}") from e
    if not callable(getattr(module, attr, None)):
        raise AttributeError(f"{what}: module {target!r} has no callable {attr!r} (from fn={fn!r})")
    return getattr(module, attr)


def takes_argument(fn: Callable[..., Any], name: str, *, var_keyword: bool = False) -> bool:
    """Whether ``fn`` has a parameter ``name`` (or, with ``var_keyword``, takes ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind is not p.VAR_POSITIONAL or var_keyword and p.kind is p.VAR_KEYWORD
               for p in params)


@register_scorer("callable")
class CallableScorer(PerSampleScorer):
    """``fn(prompt_text, completion, meta) -> float``, given as ``"module:function"`` or a callable.

    Whole episode: a function with a parameter named ``episode`` is also given ``episode=``, the sample's
    :class:`~seqpg.rollout.episodes.Episode` (its ``messages``, ``turns`` with their ``tool_results``, its
    environment ``env``), or None in a single-turn run."""

    def __init__(self, name: str, *, fn: str | Callable[[str, str, dict], float]) -> None:
        super().__init__(name)
        self.fn = resolve_callable(fn, what=f"scorer {name!r}")
        self.uses_episodes = takes_argument(self.fn, "episode")

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None, *, episodes: Sequence[Any] | None = None) -> list[float]:
        if not self.uses_episodes:
            return super().__call__(prompts, completions, tokens)
        episodes = [None] * len(prompts) if episodes is None else episodes
        return [self.fn(p.text, c, p.meta, episode=e) for p, c, e in zip(prompts, completions, episodes, strict=True)]

    def score_one(self, prompt: Prompt, completion: str) -> float:
        return self.fn(prompt.text, completion, prompt.meta)  # score_batch checks that it is a finite number


@register_scorer("dense_callable")
class DenseCallableScorer(Scorer):
    """``fn(prompt_text, completion, tokens, meta) -> list[float]``, one reward per completion token."""

    dense = True

    def __init__(self, name: str, *, fn: str | Callable[[str, str, list[str], dict], Sequence[float]]) -> None:
        super().__init__(name)
        self.fn = resolve_callable(fn, what=f"scorer {name!r}")

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None) -> list[list[float]]:
        if tokens is None:
            raise ValueError(f"dense scorer {self.name!r} needs the completion tokens "
                             "(score_batch(..., tokenizer=...))")
        return [self.fn(p.text, c, list(t), p.meta)  # score_batch checks each is a list of numbers
                for p, c, t in zip(prompts, completions, tokens, strict=True)]


TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "environments")
"""The keyword arguments TRL passes to a reward function besides the dataset columns."""


@register_scorer("trl_reward")
class TRLRewardScorer(Scorer):
    """A reward function written for TRL's ``GRPOTrainer(reward_funcs=...)``, used unchanged.

    Called once per batch, exactly as TRL calls it (trl/trainer/grpo_trainer.py,
    ``GRPOTrainer._calculate_rewards``)::

        fn(prompts=..., completions=..., completion_ids=..., trainer_state=None, **columns)
            -> list[float | None]

    * ``prompts``, ``completions``: strings (TRL's standard format) or, with ``conversational: true``, chat
      messages (TRL's conversational format): each prompt ``[{"role": "user", "content": prompt.text}]``,
      each completion ``[{"role": "assistant", "content": text}]``. seqpg's prompts are text that the sampler
      wraps in the chat template when ``sampling.chat_template`` is true; which form a function receives is
      the form it was written for, so it is this scorer's choice, not the run's. The prompt is the text the
      model was asked (instruction included); the run's ``sampling.system_prompt`` is not in the messages.
    * ``completion_ids``: each completion's token ids, EOS included (TRL keeps the EOS in its
      ``completion_mask`` too).
    * ``trainer_state``: TRL passes its ``transformers.TrainerState``; seqpg has none and passes None.
    * ``environments``: in a run with ``episode.env``, each sample's environment instance (as TRL passes them
      with ``environment_factory``), when the function names the parameter or takes ``**kwargs``.
    * ``**columns``: every other column of the prompt file (``Prompt.meta``, e.g. ``answer``), one list
      per column over the batch; None where a prompt lacks the column.

    A None score means "does not apply to this sample". TRL turns None into NaN and sums the weighted
    scores with ``nansum``, so a None contributes nothing; a sample that every function scores None gets
    0, with a warning (``_generate_and_score_completions``). seqpg does the same (``score_batch``; see
    ``ScoredBatch.applies``), and logs ``reward/<name>`` as the mean over the samples the function applied
    to (TRL's ``nanmean``) and ``reward_none/<name>``, the fraction of None. Departure: TRL would also
    accept NaN as "does not apply"; seqpg refuses non-finite numbers as for every scorer.
    """

    may_abstain = True
    uses_completion_ids = True

    def __init__(self, name: str, *, fn: str | Callable[..., Sequence[float | None]],
                 conversational: bool = False) -> None:
        super().__init__(name)
        if not isinstance(conversational, bool):
            raise ValueError(f"scorer {name!r}: conversational must be true or false, got {conversational!r}")
        self.fn = resolve_callable(fn, what=f"scorer {name!r}")
        self.conversational = conversational
        self.uses_episodes = takes_argument(self.fn, "environments", var_keyword=True)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str],
                 tokens: Sequence[Sequence[str]] | None = None, *,
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 episodes: Sequence[Any] | None = None) -> list[float | None]:
        if completion_ids is None:
            raise ValueError(f"scorer {self.name!r} needs the completion token ids (score_batch passes them)")
        if self.conversational:
            prompt_args: list[Any] = [[{"role": "user", "content": p.text}] for p in prompts]
            completion_args: list[Any] = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            prompt_args, completion_args = [p.text for p in prompts], list(completions)
        extra = {} if episodes is None else {"environments": [ep.env for ep in episodes]}  # as TRL: with environments
        return list(self.fn(prompts=prompt_args, completions=completion_args,
                            completion_ids=[list(ids) for ids in completion_ids], trainer_state=None,
                            **self.columns(prompts), **extra))

    def columns(self, prompts: Sequence[Prompt]) -> dict[str, list[Any]]:
        """Every meta column of the batch's prompts as one list per column (TRL's ``reward_kwargs``)."""
        names = list(dict.fromkeys(k for p in prompts for k in p.meta))
        clash = [k for k in names if k in TRL_ARGUMENTS]
        if clash:
            raise ScorerError(f"scorer {self.name!r}: prompt column(s) {clash} share a name with an argument TRL "
                              f"passes ({', '.join(TRL_ARGUMENTS)}); rename the column(s) in the prompt file or "
                              "leave them out with task.params.meta_columns")
        return {k: [p.meta.get(k) for p in prompts] for k in names}


# ---------------------------------------------------------------------------------------------
# shape of the text


@register_scorer("length")
class LengthScorer(PerSampleScorer):
    """Length in ``unit`` (chars or words). Without ``target``: the length itself (use a negative weight
    to penalise). With ``target``: ``-|length - target| / target`` (0 at the target, negative elsewhere)."""

    UNITS = ("chars", "words")

    def __init__(self, name: str, *, unit: str = "words", target: float | None = None) -> None:
        super().__init__(name)
        if unit not in self.UNITS:
            raise ValueError(f"scorer {name!r}: unknown unit {unit!r}; valid: {', '.join(self.UNITS)}")
        if target is not None and target <= 0:
            raise ValueError(f"scorer {name!r}: target must be positive, got {target}")
        self.unit, self.target = unit, target

    def score_one(self, prompt: Prompt, completion: str) -> float:
        n = len(completion) if self.unit == "chars" else len(completion.split())
        return float(n) if self.target is None else -abs(n - self.target) / self.target


@register_scorer("format")
class FormatScorer(PerSampleScorer):
    """1 when the completion matches regex ``pattern`` (``re.search``, or the whole text with
    ``fullmatch``; DOTALL), else 0. Default: an ``<answer>...</answer>`` pair anywhere."""

    def __init__(self, name: str, *, pattern: str = r"<answer>.*?</answer>", fullmatch: bool = False) -> None:
        super().__init__(name)
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"scorer {name!r}: invalid regex pattern {pattern!r}: {e}") from e
        self.fullmatch = fullmatch

    def score_one(self, prompt: Prompt, completion: str) -> float:
        text = completion.strip() if self.fullmatch else completion
        match = self.regex.fullmatch(text) if self.fullmatch else self.regex.search(text)
        return float(match is not None)


# ---------------------------------------------------------------------------------------------
# scoring a rollout


def _describe(scorer: Scorer, i: int, prompts: Sequence[Prompt], completions: Sequence[str]) -> str:
    return (f"scorer {scorer.name!r} on sample {i} (prompt id {prompts[i].id!r}, "
            f"completion starts {completions[i][:60]!r})")


def _number(value: Any, where: str) -> float:
    """``value`` as a float; a string or a bool is refused (``"0.5"`` or ``True`` is a bug in the scorer,
    not a score), and so is anything ``float`` cannot read."""
    if isinstance(value, (str, bytes, bool)) or type(value).__name__ == "bool_" or \
            (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ScorerError(f"{where} returned {value!r} ({type(value).__name__}), not a number; return a float")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ScorerError(f"{where} returned {value!r} ({type(value).__name__}), not a number; "
                          "return a float") from e


def _check_value(scorer: Scorer, i: int, value: Any, n_tokens: int | None, prompts,
                 completions) -> list[float] | float | None:
    where = _describe(scorer, i, prompts, completions)
    if value is None and scorer.may_abstain:
        return None
    if scorer.dense:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ScorerError(f"{where} returned {value!r}, not a list of per-token rewards")
        values = [_number(v, where) for v in value]
        if len(values) != n_tokens:
            raise ScorerError(f"{where} returned {len(values)} token rewards for {n_tokens} completion tokens")
        bad = [j for j, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ScorerError(f"{where} returned a non-finite reward {values[bad[0]]} at token {bad[0]}; "
                              "scores must be finite numbers")
        return values
    if value is None:
        raise ScorerError(f"{where} returned None, not a number (only a trl_reward scorer may return None: "
                          "'does not apply')")
    v = _number(value, where)
    if not math.isfinite(v):
        raise ScorerError(f"{where} returned a non-finite score {v}; scores must be finite numbers")
    return v


def _call(scorer: Scorer, prompts: Sequence[Prompt], completions: Sequence[str], tokens: list[list[str]] | None,
          ids: list[list[int]] | None, rows: slice, episodes: list[Any] | None = None) -> list[Any]:
    """``scorer`` on ``rows`` of the batch (with their token ids and episodes where the scorer takes them)."""
    sub_tokens = None if tokens is None else tokens[rows]
    kwargs: dict[str, Any] = {}
    if scorer.uses_completion_ids:
        kwargs["completion_ids"] = ids[rows]
    if scorer.uses_episodes:
        kwargs["episodes"] = None if episodes is None else episodes[rows]
    return list(scorer(prompts[rows], completions[rows], sub_tokens, **kwargs))


def _run_scorer(scorer: Scorer, prompts: Sequence[Prompt], completions: Sequence[str],
                tokens: list[list[str]] | None, on_error: str,
                ids: list[list[int]] | None = None, episodes: list[Any] | None = None) -> tuple[list[Any], list[bool]]:
    """(per-sample values, per-sample failed) for one scorer; a batch that raises is retried sample by
    sample so that the error names the sample that caused it."""
    B = len(completions)
    try:
        values = _call(scorer, prompts, completions, tokens, ids, slice(None), episodes)
        if len(values) != B:
            raise ScorerError(f"scorer {scorer.name!r} returned {len(values)} scores for a batch of {B} completions")
        failed = [False] * B
    except ScorerError:
        raise
    except Exception:
        values, failed = [], []
        for i in range(B):
            try:
                one = _call(scorer, prompts, completions, tokens, ids, slice(i, i + 1), episodes)
                if len(one) != 1:
                    raise ScorerError(f"{_describe(scorer, i, prompts, completions)} returned {len(one)} scores "
                                      "for 1 completion")
                values.append(one[0])
                failed.append(False)
            except ScorerError:
                raise
            except Exception as e:
                if on_error == "raise":
                    raise ScorerError(f"{_describe(scorer, i, prompts, completions)} raised "
                                      f"{type(e).__name__}: {e}") from e
                values.append([0.0] * len(tokens[i]) if scorer.dense and tokens is not None else 0.0)
                failed.append(True)
    n_tokens = [len(t) for t in tokens] if tokens is not None else [None] * B
    return [_check_value(scorer, i, v, n_tokens[i], prompts, completions) for i, v in enumerate(values)], failed


def completion_tokens(rollout: RolloutBatch, tokenizer: Any) -> list[list[str]]:
    """Decoded strings of each completion's real tokens (EOS included), for dense scorers."""
    lengths = rollout.completion_lengths_B.tolist()
    ids = rollout.completion_ids_BC[rollout.completion_mask_BC].tolist()
    pieces = tokenizer.batch_decode([[t] for t in ids])
    out, start = [], 0
    for n in lengths:
        out.append(pieces[start:start + n])
        start += n
    return out


def completion_id_lists(rollout: RolloutBatch) -> list[list[int]]:
    """Each completion's real token ids (EOS included), for scorers that take ``completion_ids``."""
    return [row[mask].tolist() for row, mask in zip(rollout.completion_ids_BC, rollout.completion_mask_BC)]


def score_batch(rollout: RolloutBatch, scorers: Sequence[tuple[Scorer, float]], *, on_error: str = "raise",
                tokenizer: Any = None) -> ScoredBatch:
    """Score every completion with every scorer and combine them with their weights.

    ``rewards_B`` is the weighted sum of the sequence scorers' scores; ``token_rewards_BC`` the weighted sum
    of the dense scorers' per-token rewards (0 on padding), present only when a dense scorer is given
    (``tokenizer`` decodes the token strings it needs). ``scores`` keeps each scorer's raw score (a dense
    scorer's: the sum over its tokens). ``correct_B`` is the AND over the scorers that define correctness.

    None (scorers with ``may_abstain``, e.g. ``trl_reward``): "does not apply to this sample". The score counts
    0 in ``rewards_B`` (TRL's ``nansum`` over weighted scores) and in ``scores``, and ``applies[name]`` is False
    there; a sample that every scorer scores None gets 0 and a warning.

    on_error: ``raise`` turns a scorer's exception into ``ScorerError`` naming scorer, sample, prompt id and
    the start of the completion; ``zero`` gives that sample 0 and counts it in ``num_scorer_errors``.
    Non-finite scores always raise.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    if not scorers:
        raise ValueError("score_batch needs at least one (scorer, weight) pair")
    names = [s.name for s, _ in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"scorers need distinct names, got {names}")
    prompts, completions = rollout.prompts, rollout.completions
    B, C = rollout.completion_ids_BC.shape
    tokens = None
    if any(s.dense for s, _ in scorers):
        if tokenizer is None:
            dense = [s.name for s, _ in scorers if s.dense]
            raise ValueError(f"dense scorer(s) {dense} need the completion token strings: "
                             "pass tokenizer= to score_batch")
        tokens = completion_tokens(rollout, tokenizer)
    ids = completion_id_lists(rollout) if any(s.uses_completion_ids for s, _ in scorers) else None
    episodes = rollout.episodes  # an episode batch's whole episodes (None when single-turn)

    seq_scores: dict[str, torch.Tensor] = {}
    dense_scores: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    failed: dict[str, list[bool]] = {}
    applies: dict[str, torch.Tensor] = {}
    for scorer, _ in scorers:
        values, failed[scorer.name] = _run_scorer(scorer, prompts, completions, tokens, on_error, ids, episodes)
        if scorer.dense:
            dense_BC = torch.zeros(B, C, dtype=torch.float32)
            dense_BC[rollout.completion_mask_BC] = torch.tensor([v for row in values for v in row], dtype=torch.float32)
            dense_scores[scorer.name] = dense_BC
            raw[scorer.name] = dense_BC.sum(dim=1)
        else:
            if scorer.may_abstain:
                applies[scorer.name] = torch.tensor([v is not None for v in values], dtype=torch.bool)
                values = [0.0 if v is None else v for v in values]
            seq_scores[scorer.name] = torch.tensor(values, dtype=torch.float32)
            raw[scorer.name] = seq_scores[scorer.name]
    if applies and len(applies) == len(scorers):  # else some scorer applies to every sample
        _warn_unscored(applies, prompts, completions)
    weights = {s.name: float(w) for s, w in scorers}

    if seq_scores:
        rewards_B, _ = combine_rewards(seq_scores, {n: weights[n] for n in seq_scores})
    else:
        rewards_B = torch.zeros(B, dtype=torch.float32)
    token_rewards_BC = None
    if dense_scores:
        token_rewards_BC, _ = combine_rewards(dense_scores, {n: weights[n] for n in dense_scores},
                                              mask=rollout.completion_mask_BC)

    correct_B = None
    judges = [s for s, _ in scorers if s.has_correctness]
    if judges:  # a sample whose judge raised (on_error="zero") counts as incorrect
        correct_B = torch.tensor([all(not failed[s.name][i] and s.correct(p, c) for s in judges)
                                  for i, (p, c) in enumerate(zip(prompts, completions))], dtype=torch.bool)
    num_errors = sum(sum(f) for f in failed.values())
    return ScoredBatch(rollout=rollout, rewards_B=rewards_B.float(), scores=raw,
                       token_rewards_BC=None if token_rewards_BC is None else token_rewards_BC.float(),
                       correct_B=correct_B, num_scorer_errors=num_errors, applies=applies)


def _warn_unscored(applies: dict[str, torch.Tensor], prompts: Sequence[Prompt], completions: Sequence[str]) -> None:
    """TRL's warning when every reward function returned None for a sample (which then gets reward 0)."""
    none_B = ~torch.stack(list(applies.values())).any(dim=0)
    if bool(none_B.any()):
        i = int(none_B.nonzero()[0])
        warnings.warn(f"every scorer ({', '.join(applies)}) returned None for {int(none_B.sum())} of {len(none_B)} "
                      f"samples, which get reward 0; the first: prompt id {prompts[i].id!r}, completion starts "
                      f"{completions[i][:60]!r}. Make at least one scorer apply to every sample", stacklevel=3)


def reward_metrics(scored: ScoredBatch, gather_cat: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                   ) -> dict[str, float]:
    """Per-scorer means ``reward/<name>`` over the whole batch (``gather_cat`` joins the processes' rows).

    A scorer that may return None is averaged over the samples it applied to (TRL's ``nanmean``; NaN when it
    applied to none) and adds ``reward_none/<name>``, the fraction of samples it scored None, and
    (when every scorer may return None) ``reward_unscored``, the fraction of samples that none applied to.
    """
    m: dict[str, float] = {}
    for name, v in scored.scores.items():
        values = gather_cat(v.float())
        if name in scored.applies:
            applies = gather_cat(scored.applies[name].float()).bool()  # floats: every backend gathers them
            m[f"reward/{name}"] = float(values[applies].mean()) if bool(applies.any()) else math.nan
            m[f"reward_none/{name}"] = float((~applies).float().mean())
        else:
            m[f"reward/{name}"] = float(values.mean())
    if scored.applies and len(scored.applies) == len(scored.scores):  # else some scorer applies to every sample
        none_B = ~torch.stack([gather_cat(a.float()).bool() for a in scored.applies.values()]).any(dim=0)
        m["reward_unscored"] = float(none_B.float().mean())
    return m


def sample_scores(scored: ScoredBatch, i: int) -> dict[str, float | None]:
    """Sample ``i``'s raw score by scorer, None where the scorer returned None."""
    return {name: None if name in scored.applies and not bool(scored.applies[name][i]) else float(v[i])
            for name, v in scored.scores.items()}
