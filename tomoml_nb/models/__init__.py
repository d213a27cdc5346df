"""Torch networks used by the method modules (no I/O, no data handling)."""
