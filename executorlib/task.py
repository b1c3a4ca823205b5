"""A submitted call on its way through the executor."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from executorlib.resources import Resources


@dataclass(eq=False, slots=True)
class Task:
    """One ``submit``: the call, what it asked for, and the future it resolves."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    resources: Resources
    future: Future = field(default_factory=Future)

    @property
    def name(self) -> str:
        """The function's name, for messages and cache files."""
        return getattr(self.fn, "__qualname__", None) or getattr(self.fn, "__name__", repr(self.fn))
