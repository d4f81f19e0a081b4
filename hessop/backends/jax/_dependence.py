"""Whether a JAX function's output depends on its inputs, read off its jaxpr.

Asked only when a product came out exactly zero, to tell a loss that ignores the
parameters (an error) from one that is flat at the point (a right answer). Operations with
inner jaxprs (``pjit``, ``cond``, ``scan``, custom derivatives) count as depending on all
their inputs: the analysis never reports a dependent output as independent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import Literal


def output_depends_on_input(fn: Callable[[Any], Any], x: Any) -> bool:
    """Whether ``fn(x)`` depends on the arrays of ``x`` (by data flow, not by value).

    >>> import jax.numpy as jnp
    >>> output_depends_on_input(lambda p: jnp.sum(p[0] ** 2), (jnp.ones(2),))
    True
    >>> output_depends_on_input(lambda p: jnp.asarray(1.0), (jnp.ones(2),))
    False
    """
    closed = jax.make_jaxpr(fn)(x)
    jaxpr = closed.jaxpr
    live = {id(v) for v in jaxpr.invars}
    for eqn in jaxpr.eqns:
        if any(id(v) in live for v in eqn.invars if not isinstance(v, Literal)):
            live.update(id(v) for v in eqn.outvars)
    return any(id(v) in live for v in jaxpr.outvars if not isinstance(v, Literal))
