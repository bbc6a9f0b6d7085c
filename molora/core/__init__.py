"""The building blocks: config, the MoLoRA layer, the expert compute paths, the router losses.

Nothing here knows about models, files or training; ``kernels/`` holds the low-level GEMMs
(imported by the compute paths that use them).
"""
