"""Half-Real Half-Fake distillation for class-incremental semantic segmentation."""

__version__ = "0.1.0"
