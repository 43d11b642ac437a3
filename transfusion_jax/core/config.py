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


# The fields that name local files or folders. A run's config.json holds them absolute, so
# that generate, evaluate or a resume read the same files from any directory (the demo gives
# relative paths: workdir/demo/autoencoder).
PATH_FIELDS = ("autoencoder.checkpoint", "data.tokenizer_model", "data.tfds_data_dir",
               "data.coco_karpathy_json", "data.coco_image_root", "data.image_files_path",
               "data.text_files_path", "data.latents_dir", "loss.lpips_vgg", "loss.lpips_lin")


def absolute_path(value):
    """A local relative path made absolute (from the current directory); empty values and URLs
    (gs://...) as they are."""
    if isinstance(value, str) and value and "://" not in value:
        return os.path.abspath(value)
    return value


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose PATH_FIELDS are absolute."""
    config = ml_collections.ConfigDict(config.to_dict())
    for field in PATH_FIELDS:
        section, _, key = field.partition(".")
        if section in config and key in config[section]:
            config[section][key] = absolute_path(config[section][key])
    if "data" in config and config.data.get("mixture"):  # each source's own path fields
        config.data.mixture = tuple(
            {k: absolute_path(v) if f"data.{k}" in PATH_FIELDS else v for k, v in entry.items()}
            if isinstance(entry, dict) else entry for entry in config.data.mixture)
    return config
