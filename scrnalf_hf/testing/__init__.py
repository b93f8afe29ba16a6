"""Testing utilities for code that talks to the Hugging Face Hub without the network.

:class:`LocalHub` is a small HTTP server on 127.0.0.1 that implements the part of the Hub API
``huggingface_hub`` uses to create repos, upload a commit (git-LFS included) and serve files
by revision. Point ``HF_ENDPOINT`` at it (``python -m scrnalf_hf.testing.local_hub`` prints the
variables) to try ``scrnalf push`` and ``from_pretrained`` offline. It is a test double: it
shows that uploads and downloads go through the real client code, not how huggingface.co
behaves (Xet storage, metadata rules, rate limits, tokens).
"""

__all__ = ["HubError", "LocalHub"]


def __getattr__(name: str):
    # Imported on first use, so ``python -m scrnalf_hf.testing.local_hub`` runs the module once.
    if name in __all__:
        from . import local_hub

        return getattr(local_hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
