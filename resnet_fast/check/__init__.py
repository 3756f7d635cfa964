"""The self-check: ``python -m resnet_fast.check`` (console script ``resnet-fast-check``).

Runs every operator of every fused backend on the current GPU against a float64 reference
and writes a validation record per backend that passed (:mod:`resnet_fast.validation`).
:mod:`resnet_fast.check.cases` lists what runs, :mod:`resnet_fast.check.runner` runs and
compares it, :mod:`resnet_fast.check.__main__` is the command. Importing this package
imports neither triton nor the kernels (``--interpret`` must be set first).
"""
