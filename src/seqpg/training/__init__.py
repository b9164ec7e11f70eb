"""The training loop and its stages: the step's stages and settings (``step``), the update (``update``),
the reference policy and the critic, dynamic sampling, the collapse watch, held-out evaluation, building
a run's parts from the configuration (``build``) and processes (``distributed``).  The run directory's
files (checkpoints, lock, logs, plots) are :mod:`seqpg.rundir`'s."""
