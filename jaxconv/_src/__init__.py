"""jaxconv's private implementation; the public API is re-exported by ``jaxconv``."""
