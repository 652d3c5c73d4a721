"""Adapters that bring OrthoModulated into other training loops (importable from the repo root)."""
