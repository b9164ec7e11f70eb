"""A simulated-user conversation: a user with a hidden preference asks for a recommendation.

    env: examples/envs/simulated_user.py:SimulatedUserEnv

The user (rule-based, seeded; an LLM-backed user would have the same reset / step shape) opens
with a vague request.  Each model turn: naming the user's hidden preference ends the episode with
reward 1; asking a question (a turn containing "?") gets a hint about the preference and a small
reward for engaging; anything else gets a nudge.  After ``patience`` user replies the user
leaves (done, reward 0 for that turn).
"""

from __future__ import annotations

import random

TOPICS = {
    "hiking": ("trail", "I like being outdoors, walking in the mountains."),
    "jazz": ("music", "I enjoy music with improvisation, saxophones and trumpets."),
    "chess": ("game", "I like quiet strategy games played on a board."),
    "baking": ("food", "I like making bread and cakes at home."),
}


class SimulatedUserEnv:
    def __init__(self, patience: int = 3, question_reward: float = 0.1):
        self.patience, self.question_reward = patience, question_reward

    def reset(self, prompt, seed):
        rng = random.Random(seed)
        self.preference = rng.choice(sorted(TOPICS))
        self.replies = 0
        opening = prompt.text or "I'm bored this weekend. Any ideas?"
        return [{"role": "system", "content": "You are a helpful assistant. Find out what the user would enjoy "
                                              "and recommend one hobby by name."},
                {"role": "user", "content": opening}]

    def step(self, model_text):
        said = model_text.lower()
        if self.preference in said:
            return None, 1.0, True, {"preference": self.preference, "found": True}
        self.replies += 1
        if self.replies > self.patience:
            return None, 0.0, True, {"preference": self.preference, "found": False}
        if "?" in model_text:
            return TOPICS[self.preference][1], self.question_reward, False, {"asked": True}
        return "Hmm, not really what I had in mind. Maybe ask me what I like?", 0.0, False, {"asked": False}
