"""A loaded model: the Flax module, its parameter pytree and its config, under a site-name prefix.

The parameters may be `LazyParams`: shapes known now, values drawn on first use. The full-size random models
are 2-20 GB; `jaxprobe info --sites/--plan` and site selection need only their shapes, so nothing is drawn
until a program actually runs (`Component.params`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, eq=False)
class LazyParams:
    """A parameter pytree known by its shapes (`jax.ShapeDtypeStruct` leaves) and drawn by `make()` when
    first asked for, once: the drawn tree is kept, so every later use sees the same arrays."""

    shapes: Any
    make: Callable[[], Any]
    _drawn: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def materialized(self) -> bool:
        return "tree" in self._drawn

    def __repr__(self) -> str:   # a pipeline's repr names its components, not thousands of leaf shapes
        return f"LazyParams({'drawn' if self.materialized else 'not drawn yet'})"

    def get(self) -> Any:
        if "tree" not in self._drawn:
            self._drawn["tree"] = self.make()
        return self._drawn["tree"]


@dataclass(frozen=True)
class Component:
    """One Flax model with its parameters: `name` is the prefix of its site names. `param_tree`: the
    parameter pytree, or `LazyParams` drawn when `params` is first read."""

    name: str
    module: Any
    param_tree: Any
    config: Any

    @property
    def params(self) -> Any:
        """The parameter arrays (drawing lazy ones now)."""
        tree = self.param_tree
        return tree.get() if isinstance(tree, LazyParams) else tree

    @property
    def abstract_params(self) -> Any:
        """The parameters as `jax.ShapeDtypeStruct`s, without drawing or copying any."""
        import jax

        tree = self.param_tree
        if isinstance(tree, LazyParams) and not tree.materialized:
            return tree.shapes
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)

    @property
    def materialized(self) -> bool:
        """Whether the parameter values exist in memory (always, unless they are lazy and not yet drawn)."""
        return not isinstance(self.param_tree, LazyParams) or self.param_tree.materialized
