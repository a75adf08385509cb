"""The library's warnings, shown once per call site under Python's default filter however often the call runs.

Python remembers a warning already shown at a line (the "default" action: once per location) only until the warning
filters change, and every ``warnings.catch_warnings()`` block counts as a change, even one that puts the same filters
back on exit. scikit-learn wraps each metric call in such a block (``check_array``, ``type_of_target``), so after an
``evaluate`` call or a stratified split Python had forgotten every warning shown before: ``evaluate`` in a loop of 31
calls printed its "default step alpha" warning 31 times, and an attack's warning at the caller's line repeated too.
:func:`warn` keeps its own memory of what it showed, valid while ``warnings.filters`` is the same list and the filter
that decides the warning (its first match, or none) is the same: a ``catch_warnings`` block of the caller's own has
a list of its own, and a ``filterwarnings``, ``simplefilter`` or ``resetwarnings`` that changes which filter matches
the warning shows it again, as Python would. Filters that do not match it leave the memory alone, where Python
forgets every warning: scipy adds two at its import, which a process's first ``evaluate`` triggers, so Python's rule
showed a loop's first library warning twice.
The filters still decide: an action that shows a warning every time (``"always"``, ``"error"``: ``-W error``,
``pytest.warns``) or never (``"ignore"``) is Python's, as without it, also when set after the first warning.
"""

import sys
import threading
import warnings

# (the warnings.filters list, {key shown while it was the one in use: the filter that decided it then})
_shown = (None, {})
_lock = threading.Lock()


def _deciding_filter(text, category, module, lineno):
    """The first entry of ``warnings.filters`` that matches this warning, as Python matches it, or None (then
    ``warnings.defaultaction`` decides)."""
    for entry in warnings.filters:
        _, message, cat, mod, line = entry
        if ((message is None or message.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module)) and (line == 0 or line == lineno)):
            return entry
    return None


def warn(message, category=UserWarning, stacklevel=1):
    """``warnings.warn(message, category, stacklevel)`` as called from the caller's frame, but under the "default",
    "module" and "once" actions not shown again where it was already shown while ``warnings.filters`` was the list it
    is and the same filter decided it (module docstring); every other action (``"always"``, ``"error"``,
    ``"ignore"``) goes to Python as it is."""
    if isinstance(message, Warning):
        category = type(message)
    try:
        frame = sys._getframe(stacklevel)
    except ValueError:  # deeper than the stack: Python names "sys"
        frame = None
    filename, lineno = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("sys", 1)
    module = frame.f_globals.get("__name__", "<string>") if frame is not None else "sys"
    text = str(message)
    deciding = _deciding_filter(text, category, module, lineno)
    action = warnings.defaultaction if deciding is None else deciding[0]
    keys = {"default": (text, category, filename, lineno), "module": (text, category, filename),
            "once": (text, category)}
    key = keys.get(action)
    global _shown
    if key is not None:
        with _lock:
            filters, shown = _shown
            if warnings.filters is not filters:  # another catch_warnings block's (or back from one): Python's too
                filters, shown = _shown = (warnings.filters, {})
            # shown before under the same deciding filter (a filter changed in place that matches it: shown again)
            if key in shown and shown[key] == (deciding, action):
                return
            shown[key] = (deciding, action)
    warnings.warn(message, category, stacklevel + 1)


def warn_outside(message, inside, category=UserWarning):
    """:func:`warn` attributed to the first frame, from its caller's on, whose file does not start with
    ``inside`` (a path prefix or a tuple of them): the user's line, past the library's own frames (and torch's
    decorators'), whatever the depth a call reaches it from; filters by module and the once-per-line rule see it."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warn(message, category, stacklevel=level)
