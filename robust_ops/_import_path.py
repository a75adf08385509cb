"""Your own defense or attack class by dotted import path (``package.module.Class``) wherever a registered name is
accepted: ``defenses.build``, ``fit``, ``attacks.build``, ``evaluate``'s attack specs and the command line. One rule
for both: registered names never contain a dot, so a name with one is a path; its module is imported (its top-level
code runs) from ``sys.path`` (PYTHONPATH; ``python -m`` adds the working directory, the ``robust-ops`` script does
not)."""

import importlib

PATH_HINT = "or a dotted import path of your own class (package.module.Class)"


def is_import_path(name):
    """Whether ``name`` is read as a dotted import path rather than a registered name."""
    return isinstance(name, str) and "." in name


def class_from_path(owner, what, path, base, base_name, required):
    """The class at ``path`` ("package.module.Class", split at the last dot), a subclass of ``base`` that implements
    the method ``required`` ("forward(x, y) -> x_adv": its name, then its signature) or ``__call__``; otherwise a
    one-line ValueError led by ``owner`` (e.g. "defenses.build") naming the path, ``what`` it was given as
    ("defense", "attack") and the fix. Errors raised by the module's own top-level code other than ImportError
    propagate unchanged: their traceback points into that code."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(f"{owner}: {what} {path!r} is not a dotted import path package.module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        # "on PYTHONPATH?" only when the module itself (or a package above it) is missing, not an import inside it
        missing = isinstance(err, ModuleNotFoundError) and err.name and (module_name + ".").startswith(err.name + ".")
        raise ValueError(f"{owner}: cannot import module {module_name!r} for {what} {path!r} ({err})"
                         + ("; is it on PYTHONPATH?" if missing else "")) from None
    if not hasattr(module, attr):
        raise ValueError(f"{owner}: module {module_name!r} has no attribute {attr!r} (for {what} {path!r})")
    cls = getattr(module, attr)
    if not isinstance(cls, type):
        kind = type(cls).__name__
        raise ValueError(f"{owner}: {what} {path!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a subclass "
                         f"of {base_name}")
    if not issubclass(cls, base):
        raise ValueError(f"{owner}: {what} {path!r} is a class but not a subclass of {base_name}")
    # the base's method raises a bare NotImplementedError at first use: a traceback after train wrote run.json
    # (an attack overriding __call__ itself never reaches forward)
    if all(getattr(cls, m) is getattr(base, m) for m in {required.partition("(")[0], "__call__"}):
        raise ValueError(f"{owner}: {what} {path!r} does not implement {required}; define it in the class")
    return cls
