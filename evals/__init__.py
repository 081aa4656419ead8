"""The lm-eval task definitions, installed as `monte_ds.evals` (pyproject.toml maps this folder).

A package, not a plain folder, so that an editable install resolves `monte_ds.evals` here too.
"""
