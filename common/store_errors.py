"""The model store's error, in a module of its own so that callers can catch it without importing torch."""

from __future__ import annotations


class StoreError(Exception):
    """A store entry is missing, corrupted or malformed."""
