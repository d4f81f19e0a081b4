"""The benchmark harness of ``hessop bench`` and the reference models it measures.

Framework code is allowed here (the package exists to exercise each framework), but every
module imports torch or JAX only when that framework is used, so ``hessop bench`` runs with
either framework alone.
"""
