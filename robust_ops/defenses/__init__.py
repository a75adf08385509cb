"""Published defenses as small per-batch loss objects (see docs/design.md)."""

from .base import Defense, DefenseOutput  # noqa: F401
