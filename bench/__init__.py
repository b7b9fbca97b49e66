"""tinyfleet benchmarks: ``./dev bench`` (or ``python -m bench [NAME ...]``)."""
