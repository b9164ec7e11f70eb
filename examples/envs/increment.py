"""TRL's ``environment_factory`` convention, unchanged: the class TRL's GRPO guide uses to introduce it.

    episode: {env: examples/envs/increment.py:IncrementEnv}
    task: {source: jsonl, name: examples/envs/increment.jsonl}   # columns: prompt, target

``reset(**row)`` receives the task's row (its ``target`` column here) and may return a string that is
appended to the prompt; every public method is a tool bound to the episode's instance; the model's
first turn without a tool call ends the episode; ``get_reward()`` is read then.
"""


class IncrementEnv:
    def reset(self, target, **kwargs) -> None:
        self.counter = 0
        self.target = target

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter
