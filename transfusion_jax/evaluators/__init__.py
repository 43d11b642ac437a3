"""Evaluators built from `config.evals` (`common.from_config`), one module per type; each takes
a model's variables and returns a dict of scalars, writing its raw outputs for inspection."""
