"""Where prompts come from and what their completions are worth: prompt sources (``tasks``) and
scorers (``scorers``), both registries keyed by name."""
