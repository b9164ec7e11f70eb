"""What users run: the command line (``cli``) and the commands behind it: ``demo``, ``explain``,
``eval`` (``session``, ``evaluate``), ``export`` and the benchmark (``bench``)."""
