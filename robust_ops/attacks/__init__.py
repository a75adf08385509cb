"""Adversarial attacks on one shared PGD core (see docs/design.md)."""

from .context import Normalized, attack_context  # noqa: F401
