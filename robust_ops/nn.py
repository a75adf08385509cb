"""nn.Module front ends of the robust_ops kernels: DropMax2d and replace_maxpool."""

import ast
import inspect
import textwrap

import torch
from torch import nn
from torch.export.unflatten import InterpreterModule, UnflattenedModule

from . import _backend
from ._patching import _is_swap_attribute, is_installed_forward
from ._warn import warn
from .functional import _bool, _pool_args, drop_max_pool2d

__all__ = ["DropMax2d", "replace_maxpool"]

# torch.fx traces DropMax2d.forward (not a torch.nn leaf module): keep the call as one node, as nn.MaxPool2d is.
torch.fx.wrap("drop_max_pool2d")


class DropMax2d(nn.Module):
    r"""Drop-max pooling (MIRST-DM, Sun et al., MICCAI 2022), a drop-in replacement for :class:`torch.nn.MaxPool2d`.

    Per pooling window it removes ONE occurrence of the maximum and outputs the largest remaining value (the second
    order statistic: window ``[5, 5, 1]`` gives 5). MIRST-DM puts it in place of the first max-pooling layer of a CNN
    to drop the single most perturbation-sensitive activation of each window.

    Windows are exactly those of :class:`~torch.nn.MaxPool2d` (-inf padding that is never selected, dilation,
    ceil_mode). Ties: the removed maximum is its first occurrence in row-major window order and the output is the
    first occurrence of the largest remaining value. A window with a single valid element returns it; a window
    holding NaN returns NaN. The gradient flows to the selected element. See docs/ops/drop_max_pool2d.md.

    Args:
        kernel_size (int or (int, int)): window size.
        stride (int or (int, int), optional): window stride. Default: ``kernel_size``.
        padding (int or (int, int)): implicit -inf padding on both sides, at most ``kernel_size // 2``. Default: 0.
        dilation (int or (int, int)): spacing between window elements. Default: 1.
        return_indices (bool): also return the flat ``H * W`` indices of the selected elements (usable with
            :class:`~torch.nn.MaxUnpool2d`). Default: False.
        ceil_mode (bool): ceil instead of floor for the output size. Default: False.
        backend (str, optional, keyword only): "auto", "native", "triton" or "reference"; default
            ``$ROBUST_OPS_BACKEND`` or "auto".

    Shape:
        - Input: :math:`(N, C, H_{in}, W_{in})` or :math:`(C, H_{in}, W_{in})`, float16/bfloat16/float32/float64,
          NCHW or channels_last.
        - Output: :math:`(N, C, H_{out}, W_{out})` or :math:`(C, H_{out}, W_{out})`, sizes as for MaxPool2d; the
          output and input gradient take MaxPool2d's strides (docs/ops/drop_max_pool2d.md, "Layouts").

    Raises (when constructed, naming DropMax2d and the argument):
        TypeError: a size that is not an int or a pair of ints, a flag that is not a bool.
        RuntimeError: a kernel_size, stride or dilation below 1, a negative padding or one above kernel_size // 2.
        ValueError: an unknown backend.

    Example::

        >>> pool = robust_ops.DropMax2d(3, stride=2, padding=1)
        >>> pool(torch.randn(8, 64, 112, 112)).shape
        torch.Size([8, 64, 56, 56])
    """

    __constants__ = ["kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"]

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False, *,
                 backend=None):
        super().__init__()
        if backend is not None and backend not in _backend.BACKENDS:  # fail here, not at the first forward
            raise ValueError(
                f"DropMax2d: expected backend to be one of {', '.join(_backend.BACKENDS)}, got {backend!r}"
            )
        # Also fail here, naming the layer: nn.MaxPool2d(0) builds and fails at its first forward, "drop_max_pool2d:"
        # named neither DropMax2d nor where in a model it sat (_pool_args checks the geometry). The raw values are
        # kept (repr mirrors MaxPool2d's).
        _pool_args("DropMax2d", kernel_size, stride, padding, dilation, always_check=True)
        for name, flag in (("return_indices", return_indices), ("ceil_mode", ceil_mode)):
            _bool("DropMax2d", name, flag)
        self.kernel_size = kernel_size
        self.stride = stride if (stride is not None) else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode
        self.backend = backend

    def forward(self, input):
        return drop_max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=self.return_indices, backend=self.backend,
        )

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: without it the script compiler failed
        # inside functional.py on the keyword-only backend, and a second try said "Can't redefine method: forward".
        raise RuntimeError(
            "DropMax2d: torch.jit.script is not supported (deprecated in torch); use torch.export.export or "
            "torch.jit.trace, which record the robust_ops::drop_max_pool2d op (docs/ops/drop_max_pool2d.md)"
        )

    def extra_repr(self):
        text = (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )
        return text if self.backend is None else f"{text}, backend={self.backend!r}"


# modules whose pooling is graph ops, not layers: traced, scripted, fx and exported (also unflattened) programs
_GRAPH_MODULES = (torch.jit.ScriptModule, torch.fx.GraphModule, UnflattenedModule, InterpreterModule)


# max pooling that replace_maxpool leaves alone (DropMax2d has MaxPool2d's fixed 2-D windows): named in its error
_OTHER_MAX_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.FractionalMaxPool2d,
                    nn.FractionalMaxPool3d)


# what nn.MaxPool2d's constructor sets; anything else in a pool's __dict__ the user set by hand (pool.tag = "stem")
_MAXPOOL_ATTRIBUTES = frozenset(vars(nn.MaxPool2d(1))) | {"forward"}  # forward: checked by _check_plain_pool
_DROPMAX_ATTRIBUTES = frozenset(vars(DropMax2d(1)))


# What every class has (and an __init__, whose work the instance holds): a subclass of nn.MaxPool2d defining only
# these loses nothing when its layer becomes a DropMax2d.
_CLASS_BOOKKEEPING = frozenset(("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                                "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__",
                                "__init__"))


def _user_attributes(pool):
    # Not the instance __getstate__ / __prepare_scriptable__ a native_layers block (an attack's, a user's) puts on a
    # pool it swaps: moved to the DropMax2d, the __getstate__ (which reads the pool) made every later deepcopy,
    # pickle or torch.save of the model a copy of the old pool's state, a DropMax2d without backend. A __getstate__
    # of the user's own that the swap wraps moves as it does outside the block.
    moved = {}
    for name, value in vars(pool).items():
        if name in _MAXPOOL_ATTRIBUTES:
            continue
        if _is_swap_attribute(pool, name, value):
            if name != "__getstate__" or value.args[1] is None:
                continue
            value = value.args[1]
        moved[name] = value
    return moved


def _from_maxpool(where, pool, backend):
    try:
        drop_max = DropMax2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                             pool.ceil_mode, backend=backend)
    except (TypeError, RuntimeError) as error:  # nn.MaxPool2d(0) builds (it fails at its first forward): say which
        raise type(error)(f"replace_maxpool: {where} ({pool!r}) cannot become a DropMax2d: {error}") from None
    drop_max.train(pool.training)  # an eval() model stays in eval mode
    # attributes set by hand (a tag a feature extractor or a pruning script reads) move along; they were dropped
    for name, value in _user_attributes(pool).items():
        setattr(drop_max, name, value)
    # hooks registered on the pool keep running on its replacement (a feature extractor's hook, say). The dicts
    # themselves move, not copies: a hook's RemovableHandle holds (weak references to) them, so handle.remove()
    # still removes it (with copies it kept firing on the DropMax2d).
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks"):
        setattr(drop_max, name, getattr(pool, name))
    # which kind the backward hooks are (full or the old register_backward_hook): without it torch skips them silently
    drop_max._is_full_backward_hook = pool._is_full_backward_hook
    return drop_max


def _check_plain_pool(where, pool):
    if type(pool).forward is not nn.MaxPool2d.forward:
        raise ValueError(
            f"replace_maxpool: {where} is a {type(pool).__name__}, an nn.MaxPool2d subclass with its own forward, "
            "which a DropMax2d would not run; swap it yourself (robust_ops.DropMax2d takes MaxPool2d's arguments)"
        )
    # methods and class attributes of the subclass (or of a mixin) would be gone from the layer: a caller of
    # pool.describe() failed later with an AttributeError, a reader of a class-level tag got its default silently.
    # Its __init__ has done its work: the arguments and attributes it set move to the DropMax2d.
    members = sorted({name for cls in type(pool).__mro__ if cls not in nn.MaxPool2d.__mro__ for name in vars(cls)}
                     - _CLASS_BOOKKEEPING)
    if members:
        raise ValueError(
            f"replace_maxpool: {where} is a {type(pool).__name__}, an nn.MaxPool2d subclass defining "
            f"{_listed([repr(m) for m in members])}, which a DropMax2d would not have; swap it yourself "
            "(robust_ops.DropMax2d takes MaxPool2d's arguments) or drop them from the class"
        )
    # nn.MaxPool2d takes any truthy return_indices (1, "no"); DropMax2d's flags are bools, refused at its first
    # forward: refused here, before the model changes, naming the layer
    for flag in ("return_indices", "ceil_mode"):
        value = getattr(pool, flag)
        if not isinstance(value, bool):
            raise TypeError(f"replace_maxpool: {where} has {flag}={value!r}, but DropMax2d takes a bool; set "
                            f"its {flag} to True or False first")
    # pooling has no state: a parameter, buffer or submodule registered on the pool (an observer, a counter) would
    # leave the model and its state_dict with the pool, silently
    held = [f"{kind} {name!r}" for kind, items in (("parameter", pool._parameters), ("buffer", pool._buffers),
                                                   ("submodule", pool._modules)) for name in items]
    # state-dict hooks (they can add keys) do not move as the forward/backward hooks do: torch binds the load hooks
    # to the module they were registered on (a weak reference, dead once the pool is gone)
    held += [f"{len(hooks)} {kind} hook(s)" for kind, hooks in (
        ("state_dict", {**pool._state_dict_hooks, **pool._state_dict_pre_hooks}),
        ("load_state_dict", {**pool._load_state_dict_pre_hooks, **pool._load_state_dict_post_hooks})) if hooks]
    if held:
        raise ValueError(
            f"replace_maxpool: {where} holds {', '.join(held)}, which a DropMax2d would not keep (nor the model's "
            "state_dict); remove them first or swap it yourself (robust_ops.DropMax2d takes MaxPool2d's arguments)"
        )
    # the user's attributes move to the DropMax2d (_from_maxpool), except one that would overwrite DropMax2d's own
    clash = sorted(_DROPMAX_ATTRIBUTES.intersection(_user_attributes(pool)))
    if clash:
        raise ValueError(
            f"replace_maxpool: {where} has attribute(s) {', '.join(map(repr, clash))} set by hand, which DropMax2d "
            "uses itself; rename or delete them first (DropMax2d's backend is replace_maxpool's backend argument)"
        )
    # pool.compile() (nn.Module.compile) binds a compiled call of the pool's own max pooling to it: moved along as
    # an attribute set by hand, the DropMax2d ran that call, max pooling under the DropMax2d's repr, silently
    if pool.__dict__.get("_compiled_call_impl") is not None:
        raise ValueError(
            f"replace_maxpool: {where} was compiled in place (pool.compile()), and its compiled call runs max "
            "pooling, which a DropMax2d would take along; call replace_maxpool before compile(), then compile"
        )
    own = pool.__dict__.get("forward")  # a user's `pool.forward = ...` (native layers' own swap is not theirs)
    if own is not None and not is_installed_forward(pool, own):
        raise ValueError(
            f"replace_maxpool: {where} has its own instance forward ({own!r}), which a DropMax2d would not run; "
            "swap it yourself (robust_ops.DropMax2d takes MaxPool2d's arguments)"
        )


def _calls_max_pool2d(cls):
    # F.max_pool2d / torch.max_pool2d / robust_ops.max_pool2d read in any method of the class or of its own bases
    # (torchvision's InceptionB.forward calls self._forward, which pools); drop_max_pool2d and adaptive_max_pool2d
    # are other names. torch.nn's classes pool with layers only (MaxPool2d itself is skipped by the caller). Source
    # that cannot be read (built-in, exec'd) counts as no call.
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn.") or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        local = _local_reads(tree) | _receiver_reads(tree)
        if any(_names_max_pool2d(node) and id(node) not in local for node in ast.walk(tree)):
            return True
    return False


def _local_reads(tree):
    """The ids of the Name nodes in tree that read a name their own function binds (a parameter, an assignment, a
    loop variable): forward(self, x, max_pool2d=True) or pool = self.pool reads its own max_pool2d, not F's (an
    alias of F's, max_pool2d = F.max_pool2d, is found by its F.max_pool2d; an import by the import's name)."""
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = fn.args
            body = [ast.walk(stmt) for stmt in (fn.body if isinstance(fn.body, list) else [fn.body])]
            nodes = [node for walk in body for node in walk if isinstance(node, ast.Name)]
            bound = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg] if a}
            bound |= {node.id for node in nodes if not isinstance(node.ctx, ast.Load)}
            local |= {id(node) for node in nodes if node.id in bound}
    return local


def _receiver_reads(tree):
    """The ids of the Attribute nodes in tree that read max_pool2d off a method's own receiver, its first parameter:
    self.max_pool2d(x) is a layer of that name (seen as a module, a method in its own source), whatever the method
    calls its receiver (def forward(this, x): this.max_pool2d(x) warned that the forward left max_pool2d calls), a
    lambda the class body binds (forward = lambda this, x: this.max_pool2d(x)) too."""
    reads = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            if isinstance(fn, (ast.Assign, ast.AnnAssign)) and isinstance(fn.value, ast.Lambda):
                fn = fn.value
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or any(
                    isinstance(d, ast.Name) and d.id == "staticmethod" for d in getattr(fn, "decorator_list", ())):
                continue
            receiver = (fn.args.posonlyargs + fn.args.args or [None])[0]
            reads |= {id(node) for node in ast.walk(fn) if receiver is not None and isinstance(node, ast.Attribute)
                      and isinstance(node.value, ast.Name) and node.value.id == receiver.arg}
    return reads


def _names_max_pool2d(node):
    """Whether an AST node reads max_pool2d: F.max_pool2d(x, 2), a bare imported max_pool2d, or one stored for later
    (self.pool = F.max_pool2d). Not self.max_pool2d(x): a layer of that name is seen as a module, a method in its own
    source; its call warned that the forward of a model pooling only with that layer left max pooling calls."""
    names = ("max_pool2d", "max_pool2d_with_indices")
    if isinstance(node, ast.Name):
        return isinstance(node.ctx, ast.Load) and node.id in names
    return (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id == "self"))


def _max_pool2d_callers(model):
    """"Class 'name'" of each module whose methods pool with a max_pool2d call, which no layer swap reaches
    (torchvision's inception_v3: InceptionB, InceptionD)."""
    calls = {}  # per class: its source is parsed once, not once per module of it
    for m in model.modules():
        if type(m) not in calls:
            calls[type(m)] = _calls_max_pool2d(type(m))
    return [f"{type(m).__name__} {name!r}" for name, m in model.named_modules()
            if not isinstance(m, (nn.MaxPool2d, DropMax2d))  # MaxPool2d's forward is F.max_pool2d: the layer itself
            and calls[type(m)]]


def replace_maxpool(model, which="first", *, backend=None):
    """Swap ``nn.MaxPool2d`` layers of ``model`` for :class:`DropMax2d` with identical arguments, in place.

    Args:
        model (nn.Module): the network (e.g. a torchvision ResNet, VGG or DenseNet).
        which (str): "first" -- the first MaxPool2d in module registration order (MIRST-DM replaces the first
            pooling layer) -- or "all". Calling it again is a no-op: "first" leaves the model alone when its first
            max/drop-max pool is a DropMax2d already (it never moves on to the second pool), "all" when no
            MaxPool2d is left but DropMax2d layers are.
            "all" warns naming the modules whose methods pool with max_pool2d calls (torchvision's inception_v3:
            InceptionB, InceptionD), which stay max pooling: only layers are swapped.
        backend (str, optional): passed to every new DropMax2d.

    Returns:
        model itself, modified (a bare ``nn.MaxPool2d`` passed as model cannot change type in place: its
        replacement is returned instead).

    Raises:
        ValueError: when ``which`` is not "first"/"all", the model holds no ``nn.MaxPool2d``, or a pool to replace
            is a subclass with its own ``forward`` or other methods or class attributes (beyond ``__init__``), has
            an instance-level ``forward`` of the user's (the swap would drop what that forward does), holds a
            parameter, buffer or submodule (they would leave the model) or state-dict hooks (which can add keys), or
            has an attribute set by hand that DropMax2d uses itself (``pool.backend = ...``), or was compiled in
            place (``pool.compile()``) or on its own (``torch.compile(pool)`` as a layer): its compiled call would
            run max pooling; replace first, then compile.
        TypeError: when ``model`` is not an ``nn.Module``; when a pool to replace has a ``return_indices`` or
            ``ceil_mode`` that is not a bool (``nn.MaxPool2d(2, return_indices=1)``): DropMax2d's flags are bools;
            TypeError or RuntimeError naming the layer when DropMax2d refuses its sizes (``nn.MaxPool2d(0)`` builds,
            and fails at its forward).
    """
    if which not in ("first", "all"):
        raise ValueError(f"replace_maxpool: expected which to be 'first' or 'all', got {which!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_maxpool: expected model to be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.MaxPool2d):
        _check_plain_pool("model", model)
        return _from_maxpool("model", model, backend)
    pooling = [m for _, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, DropMax2d))]
    considered = pooling[:1] if which == "first" else pooling
    if considered and all(isinstance(m, DropMax2d) for m in considered):
        return model  # replaced already
    pools = [m for m in pooling if isinstance(m, nn.MaxPool2d)]
    if not pools:
        # a traced or exported graph holds its pooling as ops, not as nn.MaxPool2d modules; also the modules
        # torch.export.unflatten rebuilds from an ExportedProgram (they were sent looking for F.max_pool2d calls)
        graphs = [name for name, m in model.named_modules() if isinstance(m, _GRAPH_MODULES)]
        hint = ""
        if graphs:
            where = "it is" if graphs[0] == "" else f"its submodule {graphs[0]!r} is"
            hint = f"; {where} a traced or exported graph: replace on the eager model, then trace or export"
        # max pooling of other kinds (adaptive, fractional, 1-D, 3-D) has no drop-max counterpart here: say it is seen
        other = [f"{type(m).__name__} {repr(name) if name else '(the model)'}" for name, m in model.named_modules()
                 if isinstance(m, _OTHER_MAX_POOLS)]
        if other and not hint:
            hint = (f"; it holds {_listed(other)}, which replace_maxpool leaves alone: DropMax2d replaces "
                    "nn.MaxPool2d's fixed 2-D windows only")
        elif not hint:
            callers = _max_pool2d_callers(model)
            verb, their = ("pools", "its") if len(callers) == 1 else ("pool", "their")
            hint = (f"; {_listed(callers)} {verb} with max_pool2d calls in {their} forward (not layers): call "
                    "robust_ops.drop_max_pool2d there") if callers else (
                "; if a forward pools with F.max_pool2d (a call, not a layer), call robust_ops.drop_max_pool2d there")
        raise ValueError(
            f"replace_maxpool: {type(model).__name__} has no nn.MaxPool2d layer to replace "
            f"(looked through all submodules in registration order){hint}"
        )
    targets = pools[:1] if which == "first" else pools
    names = {id(m): name for name, m in model.named_modules()}
    # torch.compile(pool) set as a layer: the OptimizedModule's forward is bound to the pool it wrapped, so with its
    # _orig_mod swapped the model printed a DropMax2d and max-pooled, silently
    wrapped = {id(m._orig_mod) for m in model.modules() if isinstance(getattr(m, "_orig_mod", None), nn.MaxPool2d)}
    for pool in targets:
        _check_plain_pool(repr(names[id(pool)]), pool)
        if id(pool) in wrapped:
            raise ValueError(
                f"replace_maxpool: {names[id(pool)]!r} is compiled on its own (torch.compile(pool)), whose compiled "
                "forward runs that pool's max pooling whatever it holds; call replace_maxpool before torch.compile"
            )
    replacements = {id(pool): _from_maxpool(repr(names[id(pool)]), pool, backend) for pool in targets}
    # A pool registered under several parents (shared instance) is replaced everywhere it appears.
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    if which == "all":
        # pooling by a call in a forward stays max pooling: said, as "all" reads as every max pooling of the model
        callers = _max_pool2d_callers(model)
        if callers:
            warn(f"replace_maxpool: which='all' leaves the max_pool2d calls in the forward of {_listed(callers)} "
                 "as max pooling (calls, not layers); for drop-max there, call robust_ops.drop_max_pool2d in that "
                 "forward", UserWarning, stacklevel=2)
    return model


def _listed(items):
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
