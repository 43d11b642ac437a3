"""Config helpers: `get_config(arg)` argument parsing and loading a config file by spec.

An experiment file `experiments/X.py` defines `get_config(arg)`; the arg is a comma-separated
list `key=value`, where a bare word sets the first key (so `X.py:tiny` == `X.py:size=tiny`).
"""
import importlib.util
import os

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse 'a=1,b=x' against `defaults`, casting to each default's type."""
    out = dict(defaults)
    first = next(iter(defaults)) if defaults else None
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = first, item
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config arg {key!r} is unknown; expected one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}; expected true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"config arg {key}={value!r}; expected a {kind.__name__}") from None
    return ml_collections.ConfigDict(out)


def load_module(path: str):
    """An experiment file as a module (for its get_config and helpers such as size tables)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'path/to/file.py[:arg]' -> that file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    return load_module(path).get_config(arg or None)
