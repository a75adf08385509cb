"""Swapping module forwards while a ``with`` block lasts, and which setting of such a switch applies: shared by
native_layers and prepacked_conv."""

import contextlib
import functools
import inspect
import threading

from torch import nn

_lock = threading.Lock()
_patched = {}  # id(module) -> [module, depth, replacement, switch, on without an explicit setting of its own]
# Explicit settings of the switch contexts now open: (switch, id(module)) -> [module, [enabled, ...]]
_decisions = {}


def _dispatch(module, *args, **kwargs):
    # The installed forward: runs the replacement only for the very module registered, the class's own forward
    # otherwise (after the block, for a partial a user kept).
    replacement = active_replacement(module)
    if replacement is not None:
        return replacement(module, *args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


class _InstalledForward(functools.partial):
    """``partial(_dispatch, module)``. Copies and pickles of the module leave it out (:func:`_state_without_swap`);
    one of the partial itself (held elsewhere) gets the class's own forward bound to the module's copy, as
    ``module.forward`` reads without the swap: nothing would ever remove a copied partial, which broke
    torch.jit.script of the copy and tied its pickle to robust_ops._patching."""

    def __reduce__(self):
        return getattr, (self.args[0], "forward")  # read while unpickling, before the copy's __dict__ is set


def _state_without_swap(module, own=None):
    """``module.__getstate__`` while it is swapped: the class's state (or that of ``own``, an instance __getstate__
    the module had before the swap) without the swap's instance attributes, so a copy (copy.copy or copy.deepcopy),
    pickle or torch.save of the module taken inside the block (an EMA snapshot in a custom defense inside fit) is not
    swapped and runs its class's own forward on itself. A shallow copy kept the partial, which names the original
    module: it ran the original's forward, with the original's attributes (a kernel_size set on the copy had no
    effect), during the block and after it."""
    state = type(module).__getstate__(module) if own is None else own()
    if isinstance(state, dict):
        swap = {k for k, v in state.items() if _is_swap_attribute(module, k, v)}
        state = {k: v for k, v in state.items() if k not in swap}
        if own is not None and "__getstate__" in swap:  # the copy gets the module's own back, as after the block
            state["__getstate__"] = own
    return state


def _refuse_scripting(module):
    """``module.__prepare_scriptable__`` while it is swapped, which torch.jit.script calls on every module before it
    compiles any. Compiling reads ``getattr(module, "forward")``, the installed partial, as a function (source,
    globals): it failed with "'_InstalledForward' object has no attribute '__globals__'". Handing torch.jit a swap-free
    copy instead would put the copy into the user's model (torch.jit stores the result in the parent's modules)."""
    raise RuntimeError(f"torch.jit.script of {type(module).__name__} inside native_layers or prepacked_conv (which "
                       "attacks and fit enter) is not supported: script the model outside the with block")


_SWAP_ATTRIBUTES = {"forward": _dispatch, "__getstate__": _state_without_swap,
                    "__prepare_scriptable__": _refuse_scripting}


def _is_swap_attribute(module, key, value):
    """Whether ``module.__dict__[key] = value`` is the swap's own (its forward, __getstate__ or
    __prepare_scriptable__), not the user's."""
    return (key in _SWAP_ATTRIBUTES and isinstance(value, functools.partial) and value.func is _SWAP_ATTRIBUTES[key]
            and value.args[0] is module)


def is_installed_forward(module, forward):
    """Whether ``forward``, the instance attribute ``module.forward``, is the swap's (installed or copied along)
    rather than a user's own: the installed partial, or what a copy or pickle of it gives."""
    if isinstance(forward, functools.partial):
        return forward.func is _dispatch
    return inspect.ismethod(forward) and forward.__self__ is module and forward.__func__ is type(module).forward


def active_replacement(module):
    """The replacement forward ``module`` runs now, or None: also None while the innermost explicit setting of the
    switch that installed it is False (``with native_layers(model, False):`` inside a block that swapped the modules
    already, such as ``fit`` or an attack, must switch them off, not leave the outer swap running)."""
    entry = _patched.get(id(module))
    if entry is None or entry[0] is not module:
        return None
    decision = _decisions.get((entry[3], id(module)))
    stack = decision[1] if decision is not None and decision[0] is module else None
    return entry[2] if (stack[-1] if stack else entry[4]) else None


def check_unmodified(tensor, saved, switch, module):
    """Raise, as autograd does for a saved tensor, when ``tensor`` (the weight of ``module`` that a replacement's
    autograd.Function reads again in its backward) no longer is what the forward saw: ``saved`` is
    ``saved_state(tensor)`` taken in the forward; ``switch`` names the swap in the message. The module is formatted
    only on failure: its repr cost ~3 us per backward of every swapped layer, each attack step."""
    if saved_state(tensor) != saved:
        raise RuntimeError(f"{switch}: the weight of {module} was modified in place after the forward (version "
                           f"{tensor._version}, the forward used {saved[1]}), so the gradient would be wrong; rerun "
                           "the forward after the update")


def saved_state(tensor):
    return tensor.data_ptr(), tensor._version


@contextlib.contextmanager
def patched_forwards(model, replacements, switch, undecided=True):
    """While active, run every module of ``model`` whose exact type is a key of ``replacements`` through
    ``replacements[type](module, *inputs)``, unless the innermost explicit setting of ``switch`` (see
    :func:`switch_setting`) for that module is False, or, for a module without one, ``undecided`` is False. Nested
    and concurrent uses on one module are counted: the last exit restores its own forward. Skipped: modules with
    their own instance ``forward`` and torch.compile'd models."""
    modules = []
    # A torch.compile'd model (its modules live on in _orig_mod) keeps its own graph: changing forwards under it
    # would only force recompiles.
    if replacements and isinstance(model, nn.Module) and not hasattr(model, "_orig_mod"):
        with _lock:
            for module in model.modules():
                replacement = replacements.get(type(module))
                if replacement is None:
                    continue
                entry = _patched.get(id(module))
                if entry is not None:
                    entry[1] += 1
                elif "forward" in module.__dict__ and not is_installed_forward(module, module.__dict__["forward"]):
                    continue  # the user's own instance forward: leave it alone (ours may come with a copy)
                else:
                    module.forward = _InstalledForward(_dispatch, module)
                    # copies taken inside leave the swap out; an instance __getstate__ of the module's own gives the
                    # state (without it a shallow copy of such a module kept the partial naming the original)
                    own = module.__dict__.get("__getstate__")
                    if isinstance(own, functools.partial) and own.func is _state_without_swap:
                        own = None  # another module's, come along with a copy of its __dict__: not the user's
                    module.__dict__["__getstate__"] = functools.partial(_state_without_swap, module, own)
                    # a user's own stays; another module's refusal, come along as its __getstate__ above, does not:
                    # kept, it outlived every block and refused torch.jit.script of this module for good
                    prepare = module.__dict__.get("__prepare_scriptable__")
                    copied = isinstance(prepare, functools.partial) and prepare.func is _refuse_scripting
                    if prepare is None or copied:
                        module.__dict__["__prepare_scriptable__"] = functools.partial(_refuse_scripting, module)
                    _patched[id(module)] = [module, 1, replacement, switch, undecided]
                modules.append(module)
    try:
        yield model
    finally:
        with _lock:
            for module in modules:
                entry = _patched[id(module)]
                entry[1] -= 1
                if entry[1] == 0:
                    # Only the swap's own: a forward the user set (or deleted) inside the block is theirs. Deleting
                    # it unconditionally dropped theirs, and a KeyError after theirs was deleted left the modules
                    # after it in this loop swapped for good.
                    for key in _SWAP_ATTRIBUTES:
                        value = module.__dict__.get(key)
                        if _is_swap_attribute(module, key, value):
                            own = value.args[1] if key == "__getstate__" else None
                            if own is None:
                                del module.__dict__[key]
                            else:  # the module's own, set before the block
                                module.__dict__[key] = own
                    del _patched[id(module)]


@contextlib.contextmanager
def switch_setting(switch, model, enabled, default, types):
    """The setting of ``switch`` for ``model``'s modules of ``types`` in a ``with`` block, as ``(swap, undecided)``:
    whether any module may run swapped, and the setting of those without an explicit one (both for
    :func:`patched_forwards`). Every attack opens the switches itself with ``enabled=None``: each module follows the
    innermost enclosing explicit setting for it (``fit(prepacked_conv=False)``, ``with native_layers(model,
    False):``), else ``default()`` (the switch's environment variable). An explicit True/False is recorded for the
    contexts nested in this one."""
    modules = [m for m in model.modules() if type(m) in types] if isinstance(model, nn.Module) else []
    if enabled is None:
        with _lock:
            enclosing = [entry[1][-1] for m in modules
                         if (entry := _decisions.get((switch, id(m)))) is not None and entry[0] is m]
        # per module (active_replacement): a setting for one layer said nothing about the others, which took it too
        undecided = bool(default())
        yield any(enclosing) or (undecided and len(enclosing) < len(modules)), undecided
        return
    with _lock:
        for m in modules:
            _decisions.setdefault((switch, id(m)), [m, []])[1].append(bool(enabled))
    try:
        yield bool(enabled), bool(enabled)
    finally:
        with _lock:
            for m in modules:
                stack = _decisions[(switch, id(m))][1]
                stack.pop()
                if not stack:
                    del _decisions[(switch, id(m))]
