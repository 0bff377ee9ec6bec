"""From a batch to log-probs: batching (``batching``: the ``Batch`` schema, padding, masks), the
forward pass with or without a shared prompt (``forward``, ``prefix``), the vocabulary head
(``logps``), the CPU stream split (``streams``) and the reference's log-probs (``reference``)."""
