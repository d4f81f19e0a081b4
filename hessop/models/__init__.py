"""Model-level curvature: ``model_hessian``, ``model_hvp``, ``model_ggn``, ``model_fisher``.

The public functions are re-exported by :mod:`hessop`. The reference models used by the
tests and ``hessop bench`` live in :mod:`hessop.bench.reference`.
"""
