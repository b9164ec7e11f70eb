"""`seqpg train --init RUN_OR_MODEL`: an RL run that starts from another run's model (e.g. `seqpg sft`'s).

A run directory (or checkpoint directory) is exported once, LoRA merged, as a Hugging Face model
directory inside the new run (``RUN/init_model``, :func:`seqpg.apps.export.export_hf`), and the new
run's ``model.name`` names it: its config.yaml then says what it started from, ``--resume`` and
``seqpg eval`` find the weights there, and the RL config's own ``model.lora_r`` applies on top.  The KL
reference is the policy as built, i.e. the warm-started model.  A model directory, .gguf file or
alias is used as ``model.name`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError

INIT_DIR = "init_model"
"""Where a run's warm-start model is exported, inside the new run directory."""


def _is_run_or_checkpoint(path: Path) -> bool:
    from ..rundir.checkpoint_files import META_FILE

    return (path / "config.yaml").is_file() or (path / META_FILE).is_file()


def init_model(target: str, run_dir: Path) -> str:
    """What the new run's ``model.name`` is: ``target`` itself for a model, or its export into ``run_dir``."""
    from ..model.loading import MODEL_ALIASES

    path = Path(target)
    if not _is_run_or_checkpoint(path):
        if path.exists() or target in MODEL_ALIASES:
            return target
        raise ConfigError(f"--init {target!r} does not exist; give a run directory (e.g. of `seqpg sft`), a "
                          "checkpoint directory or a model directory")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--init {target}: under torchrun give a model directory; export the run first "
                          f"(seqpg export {target} DIR) and pass --init DIR")
    from .export import ExportError, export_hf

    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / INIT_DIR
    try:
        export_hf(path, out, overwrite=True)
    except ExportError as e:
        raise ConfigError(f"--init {target}: {e}") from e
    print(f"seqpg: starting from {target} (exported to {out})")
    return str(out)
