"""The training loop and what it stands on: the step's stages and settings (``step``), the update
(``update``), the reference policy and the critic, checkpoints (whole and sharded), processes
(``distributed``), signals and the run-directory lock, resume, logs and plots."""
