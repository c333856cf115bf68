"""Triton kernels with their launchers and torch references: no autograd, no storage policy.

Imports nothing at package import, so that the leaf :mod:`hyclora.kernels.common` can be imported
by :mod:`hyclora.quant` without pulling in the kernels that import ``hyclora.quant``.
"""
