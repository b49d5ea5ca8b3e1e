"""The lazy-training scale of Chizat, Oyallon & Bach (NeurIPS 2019), "On Lazy Training in
Differentiable Programming", section 2.

For a model ``f(w, x)`` initialised at ``w0`` and a scale ``alpha > 0``, train the
centred, rescaled model

    h_alpha(w, x) = alpha * (f(w, x) - f(w0, x))

on the loss divided by ``alpha^2``, ``L_alpha(w) = L(h_alpha(w)) / alpha^2``. Then
``h_alpha(w0) = 0`` for every alpha, and as ``alpha -> inf`` the trained
``h_alpha`` follows the linearised model (kernel regime: the tangent kernel
``alpha^2 Theta`` times the step ``1 / alpha^2`` is fixed, while the weights move by
``O(1 / alpha)``; their Theorem 2.3). Small alpha leaves the lazy regime.

Here the wrapped model carries ``w0`` inside its parameters,
``{"w": w, "w0": w0}``, with ``w0`` frozen (:meth:`LazyApply.trainable_mask`), so
it composes with ensembles (every leaf keeps its leading axis) and jit; the
``1 / alpha^2`` scales the gradient before the optimizer sees it
(:func:`scaled`), which is the gradient of ``L / alpha^2`` for any optimizer
that acts on gradients (gd, sgd, momentum, adam; not ``ngd``, whose step is
built from the residual).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def check_alpha(alpha) -> float:
    """``alpha`` as a float, or a one-line ValueError unless finite and > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lazy_alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


@dataclasses.dataclass(frozen=True)
class LazyApply:
    """``apply_fn({"w": w, "w0": w0}, x) = alpha * (inner(w, x) - inner(w0, x))``; hashable.

    Attributes:
      inner: the model's ``apply_fn(params, x) -> (n, out_dim)``.
      alpha: the scale (> 0).
    """

    inner: Callable
    alpha: float

    def __call__(self, params, x):
        w0 = jax.lax.stop_gradient(params["w0"])
        return self.alpha * (self.inner(params["w"], x) - self.inner(w0, x))

    def trainable_mask(self, params):
        """``{"w": the inner model's mask (all trained if it has none), "w0": False}``."""
        inner = getattr(self.inner, "trainable_mask", None)
        if callable(inner):
            inner = inner(params["w"])
        return {"w": True if inner is None else inner, "w0": False}

    @property
    def vjp(self):
        """The inner model's own pullback, scaled (present only if the inner model has one)."""
        inner_vjp = getattr(self.inner, "vjp", None)
        if not callable(inner_vjp):
            raise AttributeError("vjp")

        def vjp(params, x):
            out, pull = inner_vjp(params["w"], x)
            out0 = self.inner(jax.lax.stop_gradient(params["w0"]), x)

            def pullback(ct):
                return {"w": pull(self.alpha * ct),
                        "w0": jax.tree_util.tree_map(jnp.zeros_like, params["w0"])}

            return self.alpha * (out - out0), pullback

        return vjp


def wrap(apply_fn: Callable, params, alpha: float, *, optimizer=None, trainable=None
         ) -> tuple[LazyApply, dict, Any, Any]:
    """The lazy model: ``(LazyApply, {"w": params, "w0": params}, mask, optimizer)``.

    Args:
      apply_fn, params: the model and its initialisation ``w0`` (an ensemble's
        stacked parameters work unchanged).
      alpha: the scale (> 0).
      optimizer: an optax transformation; returned as
        ``scaled(optimizer, 1 / alpha^2)`` (None: None).
      trainable: a mask (pytree prefix or callable) for the inner parameters, or
        None (the inner model's own, else everything).

    Returns:
      ``(lazy apply_fn, lazy params, trainable mask or None, optimizer)``; the mask
      is None when ``trainable`` is None (the LazyApply's ``trainable_mask`` then
      applies).
    """
    alpha = check_alpha(alpha)
    lazy = LazyApply(apply_fn, alpha)
    mask = None
    if trainable is not None:
        def mask(p, t=trainable):
            return {"w": t(p["w"]) if callable(t) else t, "w0": False}
    opt = None if optimizer is None else scaled(optimizer, 1.0 / alpha**2)
    return lazy, {"w": params, "w0": params}, mask, opt


def unwrap(params):
    """The trained inner parameters ``w`` of lazy parameters ``{"w": w, "w0": w0}``."""
    return params["w"]


def scaled(optimizer: optax.GradientTransformation, factor: float
           ) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` fed ``factor * gradient``; its state is the inner state itself (so a
    ``hyperparams`` dict in it stays reachable), extra arguments pass through."""
    inner = optax.with_extra_args_support(optimizer)

    def update(updates, state, params=None, **extra):
        updates = jax.tree_util.tree_map(lambda g: factor * g, updates)
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update)
