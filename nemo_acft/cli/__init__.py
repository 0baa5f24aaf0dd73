"""Command-line entry points besides ``acft-train``: ``acft-eval``, ``acft-harness``,
``acft-export``, and the one loader they share (:mod:`.load`)."""
