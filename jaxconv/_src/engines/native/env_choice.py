"""One environment variable that names one of a few routes, read when a call is traced.

The native engine's route switches (``JAXCONV_NATIVE_LOW``, ``JAXCONV_NATIVE_L2``) are each a
variable, its allowed values (the first the default, also for an empty value) and a context
manager that sets it for the calls traced inside a block, so that benchmarks and tests compile
the routes side by side. A function already traced under `jax.jit` keeps the route it was
traced with.

Example:
    >>> colour = EnvChoice("JAXCONV_EXAMPLE_COLOUR", ("red", "blue"))
    >>> colour.read()
    'red'
    >>> with colour.chosen("blue"):
    ...     colour.read()
    'blue'
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Generic, TypeVar

R = TypeVar("R", bound=str)


@dataclasses.dataclass(frozen=True)
class EnvChoice(Generic[R]):
    """An environment variable selecting one of ``values`` (``values[0]`` the default).

    Attributes:
        name: the variable.
        values: the allowed values, the default first.
    """

    name: str
    values: tuple[R, ...]

    def read(self) -> R:
        """The value the variable selects (case and surrounding blanks ignored).

        Returns:
            One of ``values``; the default when the variable is unset or empty.

        Raises:
            ValueError: for any other value, naming the variable and the allowed values.
        """
        raw = os.environ.get(self.name, "")
        value = raw.strip().lower() or self.values[0]
        for known in self.values:
            if value == known:
                return known
        raise ValueError(f"{self.name} must be one of {', '.join(self.values)}, got {raw!r}.")

    @contextlib.contextmanager
    def chosen(self, value: R) -> Iterator[None]:
        """The variable set to ``value`` inside the block, as it was (or unset) after it.

        Args:
            value: one of ``values``.

        Yields:
            Nothing.

        Raises:
            ValueError: for another value.
        """
        if value not in self.values:
            raise ValueError(f"route must be one of {', '.join(self.values)}, got {value!r}.")
        keep = os.environ.get(self.name)
        os.environ[self.name] = value
        try:
            yield
        finally:
            if keep is None:
                del os.environ[self.name]
            else:
                os.environ[self.name] = keep
