"""edge-trady: memory-budgeted fine-tuning on edge devices with TraDy."""

__version__ = "0.1.0"
