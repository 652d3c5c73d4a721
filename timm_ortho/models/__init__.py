"""Architectures registered with timm on import."""

from . import plain_cnn  # noqa: F401
