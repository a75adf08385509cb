"""Options, checked with messages that name the fix: which keyword options a class's constructor takes, so that
``build(name, **options)`` can name a misspelt option and list the right ones instead of Python's bare ``unexpected
keyword argument``; and the library's on/off environment switches, all parsed alike."""

import inspect
import os

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def accepted_options(cls, skip=("self", "model")):
    """Named parameters of ``cls.__init__``, followed into the base classes' constructors while each passes
    ``**kwargs`` on (in MRO order)."""
    names = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind in _NAMED and p.name not in skip and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


def check_options(owner, cls, options):
    """ValueError naming every option of ``options`` that ``cls`` does not take, and the ones it does."""
    accepted = accepted_options(cls)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
        raise ValueError(f"{owner}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"{takes}")


_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_switch(name, default):
    """The on/off environment variable ``name`` ($ROBUST_OPS_CPU_POOL, ...): 1/true/on/yes or 0/false/off/no, any
    case, spaces around ignored; unset or empty gives ``default``. ValueError naming the variable otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON or value in _OFF:
        return value in _ON
    raise ValueError(f"robust_ops: expected ${name} to be one of {'/'.join(_ON)} (on) or {'/'.join(_OFF)} (off), "
                     f"got {os.environ[name]!r}")
