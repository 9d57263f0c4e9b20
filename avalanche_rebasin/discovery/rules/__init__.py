"""The discovery rules, one module per family; importing this package registers them all."""

from . import layers, sequence, tensor

__all__ = ["layers", "sequence", "tensor"]
