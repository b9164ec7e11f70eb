"""Stateful tools: the environment's own methods are the model's tools, called on THIS episode's cart.

    episode: {env: examples/envs/cart.py:CartEnv}

A turn that calls ``add_to_cart`` / ``view_cart`` is answered by those methods (they change this
episode's cart); ``tool_step`` sees each such turn and credits it; the first turn without a call ends
the episode, rewarded 1 when the cart holds exactly the shopping list.
"""

from __future__ import annotations

import random

ITEMS = ["apple", "bread", "milk", "tea", "rice"]


class CartEnv:
    def reset(self, prompt, seed):
        rng = random.Random(seed)
        self.wanted = {item: rng.randint(1, 3) for item in rng.sample(ITEMS, 2)}
        self.cart: dict[str, int] = {}
        listing = ", ".join(f"{n} {item}" for item, n in self.wanted.items())
        return f"Put {listing} in the cart with the add_to_cart tool, then say done."

    def add_to_cart(self, item: str, quantity: int) -> str:
        """Add an item to the cart.

        Args:
            item: the item's name, e.g. "milk"
            quantity: how many to add
        """
        self.cart[item] = self.cart.get(item, 0) + quantity
        return f"cart: {self.cart}"

    def view_cart(self) -> str:
        """Show what is in the cart."""
        return f"cart: {self.cart}"

    def tool_step(self, model_text, results):
        """Per-turn credit: 0.1 for each call that added a wanted item."""
        return 0.1 * sum(r.name == "add_to_cart" and r.arguments.get("item") in self.wanted and r.error is None
                         for r in results)

    def step(self, model_text):
        return None, float(self.cart == self.wanted), True, {"cart": dict(self.cart)}
