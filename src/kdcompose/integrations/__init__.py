"""Integrations of kdcompose with training frameworks.

Each integration imports its framework lazily, so `import kdcompose` (and this package)
never imports ms-swift, transformers or trl.
"""
