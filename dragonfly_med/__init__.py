"""Dragonfly-Med: a biomedical vision-language model with multi-resolution zoom-in encoding."""

__version__ = "0.1.0"
