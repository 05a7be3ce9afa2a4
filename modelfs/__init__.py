"""modelfs: a read-only FUSE filesystem that makes `/models/<name>.gguf` just work on inference nodes."""

__version__ = "0.1.0"
__all__ = ["__version__"]
