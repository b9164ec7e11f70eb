"""A feedback environment: a reasoning-gym task where a wrong answer gets the verifier's feedback
and another try.

    env: examples/envs/feedback.py:FeedbackEnv
    env_params: {task: basic_arithmetic, max_tries: 3}

With prompts from the ``reasoning_gym`` source the episode answers the prompt's own item (its
``meta`` re-creates the dataset); otherwise it draws item ``seed`` of ``task``.  Each turn's
answer (inside ``<answer></answer>``, else the whole stripped text) goes to the task's verifier
``score_answer``.  A score of 1 ends the episode with reward 1; a lower score gets the score
and a request to try again, until ``max_tries``, whose score is the final reward (earlier wrong
tries earn 0, so the reward is the last try's score).
"""

from __future__ import annotations

from seqpg.rewards.tasks import ANSWER_INSTRUCTION, apply_instruction, make_reasoning_gym_dataset


class FeedbackEnv:
    def __init__(self, task: str = "basic_arithmetic", params: dict | None = None, max_tries: int = 3):
        if max_tries < 1:
            raise ValueError(f"FeedbackEnv: max_tries must be >= 1, got {max_tries}")
        self.task, self.params, self.max_tries = task, params or {}, max_tries

    def reset(self, prompt, seed):
        meta = prompt.meta
        if "entry" in meta and "task" in meta:  # a prompt from the reasoning_gym source
            self.dataset = make_reasoning_gym_dataset(meta["task"], meta.get("params", {}), seed=meta["seed"],
                                                      size=meta["size"])
            self.entry = meta["entry"]
            text = prompt.text
        else:
            self.dataset = make_reasoning_gym_dataset(self.task, self.params, seed=seed, size=1)
            self.entry = self.dataset[0]
            text = apply_instruction(self.entry["question"], ANSWER_INSTRUCTION)
        self.tries = 0
        return text

    def step(self, model_text):
        from reasoning_gym.utils import extract_answer

        self.tries += 1
        answer = extract_answer(model_text, tag_name="answer")
        answer = model_text.strip() if answer is None else answer
        score = float(self.dataset.score_answer(answer, self.entry))
        info = {"score": score, "try": self.tries}
        if score >= 1.0:
            return None, 1.0, True, info
        if self.tries >= self.max_tries:
            return None, score, True, info
        feedback = (f"The verifier scored your answer {answer[:80]!r} {score:.2f} out of 1: not correct. "
                    f"Try again ({self.max_tries - self.tries} tries left); put the final answer in "
                    "<answer></answer>.")
        return feedback, 0.0, False, info
