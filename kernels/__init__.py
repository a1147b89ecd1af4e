"""Triton kernels and their pure-torch references, imported as `appliance_kernels`.

NOTE: no `__version__` here, and never import this folder as `kernels`: transformers probes for
the Hugging Face `kernels` package by that name.
"""
