"""Dragonfly-Med: a biomedical vision-language model with multi-resolution zoom-in encoding.

`from dragonfly_med import load_model, ChatEngine` is the public entry point. Both are imported on
first use, so the pure geometry (`dragonfly_med.model.geometry`) stays importable without torch.
"""

__version__ = "0.1.0"
__all__ = ["ChatEngine", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from dragonfly_med.checkpoints.loading import load_model

        return load_model
    if name == "ChatEngine":
        from dragonfly_med.chat import ChatEngine

        return ChatEngine
    raise AttributeError(f"module 'dragonfly_med' has no attribute {name!r}")
