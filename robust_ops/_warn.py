"""The library's warnings, shown once per call site under Python's default filter however often the call runs.

Python remembers a warning already shown at a line (the "default" action: once per location) only until the warning
filters change, and every ``warnings.catch_warnings()`` block counts as a change, even one that puts the same filters
back on exit. scikit-learn wraps each metric call in such a block (``check_array``, ``type_of_target``), so after an
``evaluate`` call or a stratified split Python had forgotten every warning shown before: ``evaluate`` in a loop of 31
calls printed its "default step alpha" warning 31 times, and an attack's warning at the caller's line repeated too.
:func:`warn` keeps its own memory of what it showed, valid while ``warnings.filters`` is the same list with the same
entries (a ``catch_warnings`` block of the caller's own has a list of its own, and ``filterwarnings``,
``simplefilter`` or ``resetwarnings`` change the entries: there, as with Python, it is shown again).
The filters still decide: an action that shows a warning every time (``"always"``, ``"error"``: ``-W error``,
``pytest.warns``) or never (``"ignore"``) is Python's, as without it, also when set after the first warning.
"""

import sys
import threading
import warnings

# (the warnings.filters list, its entries then, the keys shown while it was the one in use and held them)
_shown = (None, (), set())
_lock = threading.Lock()


def _action(text, category, module, lineno):
    """The action ``warnings.filters`` (else ``warnings.defaultaction``) gives this warning, as Python matches it."""
    for action, message, cat, mod, line in warnings.filters:
        if ((message is None or message.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module)) and (line == 0 or line == lineno)):
            return action
    return warnings.defaultaction


def warn(message, category=UserWarning, stacklevel=1):
    """``warnings.warn(message, category, stacklevel)`` as called from the caller's frame, but under the "default",
    "module" and "once" actions not shown again where it was already shown while ``warnings.filters`` was the list,
    with the entries, it is (module docstring); every other action (``"always"``, ``"error"``, ``"ignore"``) goes to
    Python as it is."""
    if isinstance(message, Warning):
        category = type(message)
    try:
        frame = sys._getframe(stacklevel)
    except ValueError:  # deeper than the stack: Python names "sys"
        frame = None
    filename, lineno = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("sys", 1)
    module = frame.f_globals.get("__name__", "<string>") if frame is not None else "sys"
    text = str(message)
    action = _action(text, category, module, lineno)
    keys = {"default": (text, category, filename, lineno), "module": (text, category, filename),
            "once": (text, category)}
    key = keys.get(action)
    global _shown
    if key is not None:
        entries = tuple(warnings.filters)
        with _lock:
            filters, held, shown = _shown
            # another catch_warnings block's list (or back from one), or this one changed in place (filterwarnings,
            # simplefilter, resetwarnings, a module adding its filters at import): Python forgets then too
            if warnings.filters is not filters or entries != held:
                filters, held, shown = _shown = (warnings.filters, entries, set())
            if key in shown:
                return
            shown.add(key)
    warnings.warn(message, category, stacklevel + 1)


def warn_outside(message, inside, category=UserWarning):
    """:func:`warn` attributed to the first frame, from its caller's on, whose file does not start with
    ``inside`` (a path prefix or a tuple of them): the user's line, past the library's own frames (and torch's
    decorators'), whatever the depth a call reaches it from; filters by module and the once-per-line rule see it."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warn(message, category, stacklevel=level)
