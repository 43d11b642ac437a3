"""Config checks as data: (field, rule) pairs that one pass runs after command-line overrides and
before anything is written, each failure naming the field, its value and what is allowed.

    RULES = (("total_steps", positive_int), ("model.dtype", one_of("float32", "bfloat16")), ...)
    check_fields(config, RULES)

A trainer lists the fields it reads; cross-field rules (divisibility by the mesh, an image
fitting a row) stay in its `check_config`, which runs this first.
"""
import math
from typing import Any, Callable, Sequence

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what is allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


positive_int: Rule = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
non_negative_int: Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
positive_number: Rule = (lambda v: _is_number(v) and math.isfinite(v) and v > 0,
                         "a finite number > 0")
non_negative_number: Rule = (lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                             "a finite number >= 0")
integer: Rule = (_is_int, "an integer")
boolean: Rule = (lambda v: isinstance(v, bool), "true or false")


def one_of(*choices) -> Rule:
    return (lambda v: v in choices, f"one of {list(choices)}")


def fraction(low_open: bool = False, high_open: bool = True) -> Rule:
    """A number in [0, 1) by default (the bounds' openness as given)."""
    def ok(v):
        return (_is_number(v) and math.isfinite(v) and (v > 0 if low_open else v >= 0)
                and (v < 1 if high_open else v <= 1))
    return ok, f"a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def lookup(config, field: str):
    """config['a.b.c'] for a dotted field; KeyError names the missing part."""
    value = config
    for part in field.split("."):
        if part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def choice(cfg, section: str, key: str, default, choices):
    """cfg[key], one of `choices` (configs written before the field: `default`); a ValueError
    naming `section.key` and the choices otherwise. For fields read where they are used."""
    value = cfg.get(key, default)
    if value not in choices:
        raise ValueError(f"{section}.{key}={value!r}; expected one of {tuple(choices)}")
    return value


def check_fields(config, rules: Sequence[tuple[str, Rule]]) -> None:
    """Raises ValueError for the first field whose value its rule refuses (or that is missing)."""
    for field, (accepts, expected) in rules:
        try:
            value = lookup(config, field)
        except KeyError:
            raise ValueError(f"{field}: missing from the config; expected {expected}") from None
        if not accepts(value):
            raise ValueError(f"{field}={value!r}: expected {expected}")
