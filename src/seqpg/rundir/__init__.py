"""The run directory and what keeps it whole: checkpoints (whole: ``checkpoint``, their files and format:
``checkpoint_files``, sharded: ``checkpoint_dcp``), the lock (``runlock``), signals (``signals``), resume
(``resume``), logs (``runlog``, ``runfiles``) and plots (``plots``)."""
