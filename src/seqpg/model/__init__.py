"""The model as the step sees it: loading checkpoints and tokenizers (``loading``), the log-probs of a
batch's completion tokens in the trainer's layout (``policy``, with ``segment_attention`` for the
shared-prompt packing), and the FLOP counts of a step (``flops``)."""
