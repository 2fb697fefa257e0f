"""How every config key is declared: its default, its meaning and its check, together (Key).

Run keys (config.RUN_KEYS), algorithm keys (comal.KEYS and an entry's own_keys), oracle keys (each oracle
kind's KEYS), sampling arguments (sample.SAMPLING) and the toy game's options (toy_game.OPTIONS) are all
dicts of Key. The checks and the one-line errors below, and the --help texts, are made from them.
A check looks at one value; relations between keys (batch_size divisible by the world size, ...) are
checked by the code that owns them.
"""
import math
from typing import Callable, NamedTuple


class ConfigError(ValueError):
    """A bad config value: one line naming the key."""


class Key(NamedTuple):
    default: object
    meaning: str
    check: Callable  # value -> None if it is valid, else what it must be: "must be an int >= 1"


def problem(name, key, value):
    """None, or one line naming the key: 'batch_size must be an int >= 1, got 0'."""
    msg = key.check(value)
    return None if msg is None else f"{name} {msg}, got {value!r}"


def is_number(v):
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo=None):
    def check(v):
        if isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo):
            return None
        return "must be an int" + (f" >= {lo}" if lo is not None else "")
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False, why=""):
    """A finite number in the interval; lo_open / hi_open exclude the ends. `why` is added to the message."""
    def check(v):
        ok = is_number(v) and (lo is None or (v > lo if lo_open else v >= lo)) \
            and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return None
        if lo is not None and hi is not None:
            where = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            where = f" {'>' if lo_open else '>='} {lo:g}"
        else:
            where = ""
        return f"must be a finite number{where}{why}"
    return check


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def flag(v):
    return None if isinstance(v, bool) else "must be true or false"


def text(v):
    return None if isinstance(v, str) else "must be a string"


def optional(check):
    """None (off, or 'the model's own'), or a value that passes `check`."""
    def opt(v):
        msg = None if v is None else check(v)
        return msg and msg + " (or null)"
    return opt


def mapping(v):
    return None if isinstance(v, dict) else "must be a mapping"


def strings(v):
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of strings"


def schedule(lo_ok, hi):
    """A number, or a non-empty per-round list of numbers, in [0, hi] (lo_ok) or (0, hi]."""
    def check(v):
        vs = v if isinstance(v, list) else [v]
        if vs and all(is_number(x) and (x > 0 or lo_ok and x == 0) and x <= hi for x in vs):
            return None
        return (f"must be in {'[' if lo_ok else '('}0, {hi:g}] (a number, or a non-empty per-round list of "
                "numbers)")
    return check


positive = number(0, lo_open=True)


def help_lines(defs, show=repr, indent="  "):
    """'  key = default' and its meaning, for each key of a dict of Key."""
    return [f"{indent}{name} = {show(k.default)}\n{indent}    {k.meaning}" for name, k in defs.items()]
