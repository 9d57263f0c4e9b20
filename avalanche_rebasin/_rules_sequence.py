"""Discovery rules for sequence layers: recurrent nets and attention."""

from __future__ import annotations

__all__: list[str] = []
