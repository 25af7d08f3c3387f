"""Benchmarks of jaxconv's engines against ``lax`` (run ``python -m benchmarks.run --help``)."""
