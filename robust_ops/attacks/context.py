"""Model handling shared by every attack (and by IMA and the defenses): one place for mode, gradients, input and
output checks, and the losses attacks ascend.

* ``attack_context`` puts the model in the requested mode and turns parameter ``requires_grad`` off for the attack
  (so no weight gradient is ever computed, whatever loss the attack differentiates), restoring both afterwards --
  parameter ``.grad`` is never touched.
* ``attack_context`` also runs the attack under the scoped CPU memory pool (robust_ops.memory): the activations of
  each step reuse the previous step's memory instead of page-faulting fresh memory in (``ROBUST_OPS_CPU_POOL=0``
  turns it off), and under ``native_layers`` (robust_ops.native_layers): max pooling on the native kernel and a
  one-pass eval-mode batch-norm backward, bitwise the same results (``ROBUST_OPS_NATIVE_LAYERS=0`` turns it off);
  and, when switched on (``ROBUST_OPS_PREPACKED_CONV=1``, off by default: last-bit differences), convolutions on
  weights packed once per attack (robust_ops.prepacked_conv).
* Models may output ``[N, K]`` logits or ``[N]`` / ``[N, 1]`` single logits (sigmoid, positive class when > 0).
* ``InputGradScale`` takes every attack's input gradient: loss-scaled under float16 autocast (``fit(amp=True)``),
  where GradScaler reaches only the training loss, and for float16 inputs (a ``model.half()``); plain
  ``torch.autograd.grad`` otherwise.
"""

import contextlib
import contextvars
import itertools
import math
import os
import threading

import torch
import torch.nn.functional as F

from .._options import check_real, counted, label_dtype_fix, segmentation_masks
from .._warn import warn_outside
from ..native_layers import library_speedups
from ..prepacked_conv import weight_pack_scope

MODEL_MODES = ("eval", "train", "keep")


def _check_model_mode(mode):
    if mode not in MODEL_MODES:
        raise ValueError(f"attack: expected model_mode to be one of {', '.join(MODEL_MODES)}, got {mode!r}")


def _enter_model_mode(model, mode):
    """Put ``model`` in ``mode`` ("eval", "train"; "keep" leaves every module as it is)."""
    if mode != "keep":
        model.train(mode == "train")


def _set_modes(modes):
    for m, training in modes:
        m.training = training


@contextlib.contextmanager
def use_model_mode(model, mode):
    """Run forwards in ``mode`` ("eval", "train" or "keep" the current modes), restoring every module's mode."""
    _check_model_mode(mode)
    modes = [(m, m.training) for m in model.modules()]
    try:
        _enter_model_mode(model, mode)
        yield model
    finally:
        _set_modes(modes)


def model_device(model):
    """The device of ``model``'s first parameter or buffer (CPU for a model without any)."""
    return next((t.device for t in itertools.chain(model.parameters(), model.buffers())), torch.device("cpu"))


def check_model(name, model):
    """Attacks switch the model's modes and parameter flags: a plain function (AutoAttack takes any callable) failed
    with "'function' object has no attribute 'parameters'"."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name}: expected the model to be a torch.nn.Module, got {type(model).__name__}; wrap a "
                        "function in an nn.Module whose forward calls it")


class _Held:
    """A module under attack: its training flag before the first of the attacks running on it began and the attacks
    each thread runs on it now (``threads``: thread id -> [(model_mode, id of the attacked model)], outermost first).
    Kept per module, not per model: attacks on a wrapper (``Normalized``, a user's ``nn.Sequential(normalize,
    backbone)``) and on the backbone inside it share the backbone's modules."""

    __slots__ = ("training", "threads")

    def __init__(self, module):
        self.training, self.threads = module.training, {}


_held = {}  # id(module) -> _Held, while attacks run on it (a _Held keeps no reference: `seen` of each attack does)
_frozen = {}  # id(parameter) -> [its requires_grad before the first attack on it, how many attacks hold it now]
_running = {}  # thread id -> how many attacks it runs now, on any model
_held_lock = threading.Lock()
_held_changed = threading.Condition(_held_lock)  # an attack ended: the waiters of _queued look again
_queued = []  # (ticket, model_mode, ids of the modules) of the attacks waiting for attacks in another mode to end
_tickets = itertools.count()


def _conflict(modules, me, model_mode, ticket, ids):
    """(model_mode, id of its model) of the attack that keeps thread ``me`` from starting one in ``model_mode`` on
    ``modules`` (ids ``ids``) now (under _held_lock), or None. Another thread's attack in another mode on any of these
    modules, or an attack of one thread nested in another of another mode while other threads attack a module of it
    (its end puts the outer mode back), would switch the modules' modes under the attacks running. ``ticket`` None:
    the attack would be nested in one of this thread (it cannot wait), else it is queued with that ticket and waits
    behind the attacks queued before it in another mode on modules it shares (model id None)."""
    for m in modules:
        held = _held.get(id(m))
        if held is not None and any(t != me for t in held.threads):
            other = next((a for attacks in held.threads.values() for a in attacks if a[0] != model_mode), None)
            if other is not None:
                return other
    if ticket is not None:
        return next(((mode, None) for t, mode, queued_ids in _queued
                     if t < ticket and mode != model_mode and not ids.isdisjoint(queued_ids)), None)
    return None


@contextlib.contextmanager
def attack_context(model, model_mode="eval", name="attack"):
    """Run an attack on ``model`` in ``model_mode`` ("eval" default, "train", or "keep" the current modes) with
    parameter gradients off, under :func:`robust_ops.native_layers.library_speedups` for the model's device (on CPU:
    the memory pool unless ``$ROBUST_OPS_CPU_POOL`` is off, native layers unless ``$ROBUST_OPS_NATIVE_LAYERS`` is
    off, prepacked convolutions when enabled); every module's mode and every parameter's ``requires_grad`` are
    restored afterwards. ``name``: the attack its errors name.

    Attacks on one model from several threads at once in one ``model_mode`` share its state: the last one to end
    restores what the model was before the first began. Each used to restore what it saw when it began, so an attack
    that began while another ran left a train-mode model in eval with every parameter frozen (a later ``fit`` then
    trained nothing), or put it back in train mode under an attack still running. An attack nested in another of the
    same thread restores its caller's modes. An attack in another ``model_mode`` than those running on the model in
    other threads waits until they end (attacks queue in arrival order), as each sets every module's mode: the
    other's forwards ran in its mode. One nested in another attack of its thread cannot wait (two such threads would
    wait for each other): it is a RuntimeError. All of this holds per module and parameter, so for models that share
    modules too (a wrapper and the backbone in it)."""
    check_model(name, model)
    if any(torch.nn.parameter.is_lazy(p) for p in model.parameters()):  # torch's error named requires_grad_
        raise ValueError(f"{name}: the model has uninitialized parameters (lazy modules); run one forward first, "
                         "e.g. model(x[:1]), to create them")
    _check_model_mode(model_mode)
    me, key = threading.get_ident(), id(model)
    # parameters made under torch.inference_mode() (a model built or loaded there) are left as they are: freezing one
    # passed, but its requires_grad=True could not be set back outside that block, so every attack on such a model
    # failed at its end (Square too) and left it frozen for good, its other parameters' flags never restored
    modules = list(model.modules())
    params = [p for p in model.parameters() if not p.is_inference()]
    ids = frozenset(map(id, modules))
    with _held_changed:
        nested = me in _running
        ticket = None if nested else next(_tickets)
        try:
            while (other := _conflict(modules, me, model_mode, ticket, ids)) is not None:
                if nested:
                    whom = "this model" if other[1] == key else \
                        "a model that shares modules with this one (a wrapper of it, or a part of it)"
                    raise RuntimeError(
                        f"{name}: another thread is attacking {whom} in model_mode={other[0]!r}, and this attack "
                        f"(model_mode={model_mode!r}) runs inside another attack of its thread, so it cannot wait "
                        "for that one to end; attacks on one model in different model_modes cannot overlap (each "
                        "sets every module's mode): give each thread its own copy of the model (copy.deepcopy) or "
                        "use one model_mode")
                if (ticket, model_mode, ids) not in _queued:
                    _queued.append((ticket, model_mode, ids))
                _held_changed.wait()
        finally:
            if (ticket, model_mode, ids) in _queued:
                _queued.remove((ticket, model_mode, ids))
                _held_changed.notify_all()  # those queued behind it look again
        _running[me] = _running.get(me, 0) + 1
        seen = [(m, m.training) for m in modules]  # the caller's, for an attack nested in this thread
        for m in modules:
            held = _held.get(id(m))
            if held is None:
                held = _held[id(m)] = _Held(m)
            held.threads.setdefault(me, []).append((model_mode, key))
        for p in params:
            _frozen.setdefault(id(p), [p.requires_grad, 0])[1] += 1
        try:
            _enter_model_mode(model, model_mode)
            for p in params:
                p.requires_grad_(False)
        except BaseException:
            _release(me, seen, params)
            raise
    try:
        # the model's device: "cpu" for a CUDA model turned on the CPU pool and swapped forwards that only fell back
        with library_speedups(model, model_device(model)), weight_pack_scope():  # frozen: packs may be reused
            yield model
    finally:
        with _held_lock:
            _release(me, seen, params)


def _release(me, seen, params):
    """One attack of thread ``me`` ends (under _held_lock); ``seen``: its modules with their modes when it began,
    ``params``: its parameters. The last attack on a module or parameter to end restores what it was before the
    first began; one nested in another of this thread restores its caller's modes on the modules they share;
    otherwise another thread's attack still runs on the module and keeps it as it is. Attacks waiting look again."""
    _running[me] -= 1
    if not _running[me]:
        del _running[me]
    for m, caller in seen:
        held = _held[id(m)]
        mine = held.threads[me]
        mine.pop()
        if not mine:
            del held.threads[me]
        if not held.threads:
            del _held[id(m)]
            m.training = held.training
        elif mine:
            m.training = caller
    for p in params:
        frozen = _frozen[id(p)]
        frozen[1] -= 1
        if not frozen[1]:
            del _frozen[id(p)]
            p.requires_grad_(frozen[0])
    _held_changed.notify_all()


# what the checks of the channels in dim 1 say of [N, H, W, C] images
_HWC_HINT = ("images in (H, W, C) layout, as numpy arrays and PIL give them? permute them to (C, H, W): "
             "x.permute(0, 3, 1, 2)")


def hwc_hint(x, channels, other_fix):
    """What the checks of the channels in dim 1 say of ``x`` where ``channels`` were expected: for [N, H, W, C]
    images, whose last size is that count, or at most 4 (1, 3 or 4 channels), below H's and W's, ": " and the permute,
    with ``other_fix`` after it where the counts still differ once permuted (a grayscale [N, H, W, 1] set given a
    3-channel model was told only to build the model for 12 channels); "" for other shapes (the caller's fix)."""
    if x.dim() != 4 or not (x.shape[3] == channels or x.shape[3] <= 4) or x.shape[3] >= min(x.shape[1:3]):
        return ""
    if x.shape[3] == channels:
        return f": {_HWC_HINT}"
    return (f": {_HWC_HINT}; permuted, they have {counted(x.shape[3], 'channel')} where {channels} are expected: "
            f"{other_fix}")


class Normalized(torch.nn.Module):
    """Wraps a model that expects normalized inputs so attacks work in [0, 1] pixel space:
    ``Normalized(model, mean, std)(x) == model((x - mean) / std)``."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        values = []
        for arg, value in (("mean", mean), ("std", std)):
            # torch.as_tensor's "must be real number, not NoneType"; a bool (True as 1.0) is no channel statistic
            is_bool = isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool)
            try:
                values.append(torch.as_tensor(None if is_bool else value, dtype=torch.float32))
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"Normalized: expected {arg} to be a number or one number per channel, got "
                                f"{value!r}") from None
        m, sd = values
        # std 0 fed the model inf (and NaN at x == mean), so the attack ran on garbage without a word
        if not bool(torch.isfinite(m).all()) or not bool(torch.isfinite(sd).all()) or not bool((sd > 0).all()):
            raise ValueError(f"Normalized: expected finite mean and finite std > 0, got mean={m.tolist()}, "
                             f"std={sd.tolist()}")
        # stored as [1, C, 1, 1] (the layout of saved state dicts); reshaped to the input's rank at each forward
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", sd.view(1, -1, 1, 1))

    def _per_channel(self, arg, t, x):
        """``t`` broadcast along dim 1 of ``x`` ([N, C, ...] or flat [N, D]), on x's device and dtype."""
        c = t.numel()
        if c != 1 and (x.dim() < 2 or x.shape[1] != c):
            # images stacked as [N, H, W, C] (numpy, PIL) met this before the model's own input-layer check
            hwc = hwc_hint(x, c, f"give {arg} one value per channel of the data")
            raise ValueError(f"Normalized: expected x with {c} channels in dim 1 to match {arg}, got x of shape "
                             f"{tuple(x.shape)}{hwc}")
        return t.reshape((1, -1) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (-1,)).to(x)

    def forward(self, x):
        return self.model((x - self._per_channel("mean", self.mean, x)) / self._per_channel("std", self.std, x))


def is_single_logit(out):
    return out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)


class InputDtypeError(TypeError):
    """:func:`forward_naming_input_mismatch`'s refusal, told apart from a TypeError the model itself raised."""


class InputDeviceError(ValueError):
    """:func:`forward_naming_input_mismatch`'s refusal of inputs on another device than the model."""


class InputShapeError(ValueError):
    """:func:`forward_naming_input_mismatch`'s refusal of inputs whose channels (or features) the model's input layer
    was not built for, or of one sample x without its batch dimension (an image [C, H, W])."""


class NonFiniteInputError(ValueError):
    """:func:`check_inputs`' refusal of inputs holding NaN or Inf, which ``fit`` tells apart from a defense's other
    errors to name the dataset items, the epoch and the step (docs/design.md, "Non-finite values")."""


class NonFiniteOutputError(ValueError):
    """An attack's refusal of model outputs without class probabilities (NaN, +Inf, a row of only -Inf) at its first
    forward, which ``fit`` names with the epoch and step (docs/design.md, "Non-finite values"). ``count`` of
    ``inputs`` rows had none; ``message`` is the error's text."""

    def __init__(self, message, count=None, inputs=None):
        super().__init__(message)
        self.count, self.inputs = count, inputs


# torch's error when a training-mode batch-norm layer gets one value per channel (a forward of one sample)
ONE_SAMPLE_BATCH_NORM = "Expected more than 1 value per channel when training"


class OneSampleBatchNormError(ValueError):
    """A forward of 1 sample met the model's training-mode batch norm in an attack (``model_mode="train"``, or
    "keep" on a train-mode model) or a defense: torch's error (``torch_message``), which named neither the attack
    nor a fix, after the attack's or defense's name, with the fix (the error's ``message``;
    :func:`one_sample_batch_norm_error`)."""

    def __init__(self, message, torch_message=None):
        super().__init__(message)
        self.torch_message = torch_message

    def __reduce__(self):
        # with the instance's __dict__, as a plain exception's pickle has: its __notes__ and any attribute set on it
        return type(self), (str(self), self.torch_message), self.__dict__


def attack_running():
    """Whether this thread runs an attack (inside :func:`attack_context`) now."""
    return threading.get_ident() in _running


def is_one_sample_batch_norm(err):
    """Whether ``err`` is torch's refusal of a one-sample batch by a training-mode batch norm, or its rewording."""
    return isinstance(err, OneSampleBatchNormError) or (type(err) is ValueError
                                                        and str(err).startswith(ONE_SAMPLE_BATCH_NORM))


def one_sample_batch_norm_error(name, err, x, defense=False):
    """``err`` as a :class:`OneSampleBatchNormError` naming ``name`` and the fix when it is torch's one-sample
    batch-norm refusal (or an attack's rewording of it, for a ``defense``) of ``x`` of 1 sample, else None. In an
    attack the fix is ``model_mode="eval"`` (an attack in "train" may forward the last sample of a larger batch it
    still works on: APGD, FAB, Square), in a defense (its training forwards and its attack's) batches of 2 or more
    samples."""
    if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] != 1:
        return None
    if isinstance(err, OneSampleBatchNormError) and defense:
        text = err.torch_message
    elif type(err) is ValueError and str(err).startswith(ONE_SAMPLE_BATCH_NORM):
        text = str(err)
    else:
        return None
    if defense or not attack_running():
        return OneSampleBatchNormError(f"{name}: {text} (the model's batch-norm layers are in training mode and "
                                       "this batch has 1 sample); train on batches of 2 or more samples", text)
    return OneSampleBatchNormError(
        f"{name}: {text} (the model's batch-norm layers are in training mode and this forward has 1 sample: a "
        "batch of 1, or the last sample of a batch that the attack still works on); attack with model_mode='eval' "
        "(the default: batch norm then uses its running statistics)", text)


class _InputLayerReached(Exception):
    """Stops :func:`_input_layer_problem`'s forward at the first convolution or linear layer."""


_BUILD_FOR_THE_DATA = ("build the model for the data's channels and image size (robust_ops.models.build_model(name, "
                       "info.in_channels, info.num_classes, info.image_size))")


def _input_layer_problem(model, x, split):
    """Why the first convolution or linear layer the forward on ``x`` reaches cannot take what reaches it (another
    channel or feature count: a model built for another dataset), and the fix, or None. The forward stops at that
    layer. The fix is building the model for the data, or, for images in (H, W, C) layout ([N, H, W, C] as numpy and
    PIL give them: their last size is the count the convolution takes, and x itself reaches it), permuting them."""
    layers = {m: n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
              and not isinstance(m, torch.nn.modules.lazy.LazyModuleMixin)}
    reached = []

    def stop(layer, args):
        reached.append((layer, args[0] if args else None))
        raise _InputLayerReached

    hooks = [m.register_forward_pre_hook(stop) for m in layers]
    try:  # eval mode without gradients, as fails_also's forward: no statistics move
        with torch.no_grad(), use_model_mode(model, "eval"):
            model(x)
    except _InputLayerReached:
        pass
    except Exception:  # noqa: BLE001 -- it failed before any such layer: torch's error says why
        return None
    finally:
        for h in hooks:
            h.remove()
    if not reached or not torch.is_tensor(reached[0][1]):
        return None
    layer, got = reached[0]
    shape = list(x.shape[1:])
    if isinstance(layer, torch.nn.Linear):
        if got.dim() >= 1 and got.shape[-1] != layer.in_features:
            return (f"the model's input layer {layers[layer]!r} (Linear) takes in_features={layer.in_features}, "
                    f"but the inputs of {split} ({shape} each) reach it with {counted(got.shape[-1], 'feature')}; "
                    f"{_BUILD_FOR_THE_DATA}")
        return None
    # a convolution: only batched inputs [N, C, ...] (an unbatched one's dim 1 is no channel count)
    if got.dim() == len(layer.kernel_size) + 2 and got.shape[1] != layer.in_channels:
        problem = (f"the model's input layer {layers[layer]!r} ({type(layer).__name__}) takes "
                   f"in_channels={layer.in_channels}, but the inputs of {split} ({shape} each) reach it with "
                   f"{counted(got.shape[1], 'channel')}")
        hwc = hwc_hint(x, layer.in_channels, _BUILD_FOR_THE_DATA) if got.shape == x.shape else ""  # [N, H, W, C]
        return f"{problem}{hwc}" if hwc else f"{problem}; {_BUILD_FOR_THE_DATA}"
    return None


def _takes_as_one_sample(model, x):
    """Whether ``model``, whose forward failed on ``x``, gives one row of logits for ``x.unsqueeze(0)``: x is one
    sample without its batch dimension (an image [C, H, W], read as C samples; torch's "mat1 and mat2 shapes cannot
    be multiplied" from a layer, or with a label of shape [1] beside it, the label's shape, named neither). Eval mode
    without gradients, as fails_also's forward: no statistics move."""
    if x.dim() < 2:
        return False
    try:
        with torch.no_grad(), use_model_mode(model, "eval"):
            out = model(x.unsqueeze(0))
    except Exception:  # noqa: BLE001 -- it fails as one sample too: another problem, which torch's error names
        return False
    return torch.is_tensor(out) and out.dim() in (1, 2) and out.shape[0] == 1


def _refuse_one_sample(name, split, model, x):
    """An attack's x (``split`` "x") that the model failed on as a batch and takes as one sample is an
    InputShapeError naming x's shape and the fix."""
    if split == "x" and _takes_as_one_sample(model, x):
        raise InputShapeError(f"{name}: expected x to be a batch [N, ...], got shape {tuple(x.shape)}, which the "
                              "model fails on as a batch and takes as one sample: an image [C, H, W] without its "
                              "batch dimension? pass x.unsqueeze(0) (and its label as y.view(1))") from None


def forward_naming_input_mismatch(name, split, model, x):
    """model(x), in the caller's mode and gradient setting; a forward that fails only because x is not in the dtype
    of the model's parameters -- the same forward on x converted runs -- is a one-line TypeError naming ``split`` and
    the fix: torch's "Input type (double) and bias type (float) should be the same" came from inside the model's first
    layer (float64 images from numpy's x / 255.0, uint8 ones). A model that converts its inputs itself runs as is.
    Likewise x on another device than the model (CPU images from a data loader, a CUDA model: torchattacks moved them
    itself) is a one-line InputDeviceError (a ValueError) naming both devices, not torch's error from a layer. And x
    whose channel (or feature) count the first convolution or linear layer it reaches was not built for is a one-line
    InputShapeError (a ValueError) naming the layer and both counts."""
    try:
        return model(x)
    except ValueError as err:
        # a batch norm's refusal of an image [C, H, W] without its batch dimension is a ValueError ("expected 4D
        # input (got 3D input)", after a convolution that took it as unbatched): the project's CNNs all have one.
        # The one-sample training-mode refusal is core.forward's to reword
        if torch.is_tensor(x) and not is_one_sample_batch_norm(err):
            _refuse_one_sample(name, split, model, x)
        raise
    except RuntimeError as err:
        if not torch.is_tensor(x):
            raise

        def fails_also(converted):
            try:  # eval mode without gradients: an attack's train-mode forward would move BatchNorm's statistics
                with torch.no_grad(), use_model_mode(model, "eval"):
                    model(converted)
            except Exception:  # noqa: BLE001 -- it fails for another reason too: torch's error says which
                return True
            return False

        device = model_device(model)
        if x.device != device:
            if fails_also(x.to(device)):
                raise err from None
            raise InputDeviceError(f"{name}: the inputs of {split} are on {x.device}, but the model is on {device}; "
                                   f"move the inputs to the model's device (x.to('{device}'), and the labels) or the "
                                   "model to theirs") from None
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if len(dtypes) == 1 and x.dtype not in dtypes:
            (dtype,) = dtypes
            # a complex x's real part, as x.to(dtype) takes it, without torch's warning that the cast discards the
            # imaginary part: it came before this refusal, which names the dtype
            if not fails_also((x.real if x.is_complex() else x).to(dtype)):
                fix = ("make them floating-point images in the value range (x.float() / 255 for 8-bit ones)"
                       if not x.is_floating_point() else
                       f"convert the data (x.to({dtype})) or the model (model.to({x.dtype}))")
                raise InputDtypeError(f"{name}: the inputs of {split} are {x.dtype}, but the model's parameters are "
                                      f"{dtype}; {fix}") from None
        _refuse_one_sample(name, split, model, x)
        # a model built for another dataset (3-channel DermaMNIST-like images on a 1-channel model, an MLP built for
        # 64x64 images given 28x28 ones): torch's "expected input[128, 1, 28, 28] to have 3 channels" or "mat1 and
        # mat2 shapes cannot be multiplied (2x2352 and 12288x10)" named neither the data nor the fix
        problem = _input_layer_problem(model, x, split)
        if problem:
            raise InputShapeError(f"{name}: {problem}") from None
        raise


def _check_output_tensor(name, out):
    """The first half of both output rules: one floating-point tensor."""
    if not torch.is_tensor(out):  # a tuple or dict (aux outputs, HF-style) failed with "'tuple' has no attribute dim"
        raise ValueError(f"{name}: expected the model to return a logits tensor, got a {type(out).__name__}; wrap it "
                         "in an nn.Module whose forward returns only the [N, K] logits")
    if not out.is_floating_point():
        # predicted classes (an argmax) or a bool mask: autograd's "element 0 of tensors does not require grad" or an
        # int64 overflow in the CW margin came from deep inside the attack, naming neither
        raise ValueError(f"{name}: expected the model to output floating-point logits, got {out.dtype} outputs "
                         "(class predictions? return the logits, before any argmax or threshold)")


def check_output_rows(name, out, n):
    """A model output must be one floating-point tensor with one row per input (``n``), of any shape after that:
    class logits or a segmentation model's maps (gen_adv takes both)."""
    _check_output_tensor(name, out)
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"{name}: expected the model to output one row per input, [N, ...] for N={n} inputs, got "
                         f"shape {tuple(out.shape)}")
    return out


def check_output(name, out, n):
    """Model outputs must be [N, K] logits (K >= 2) or [N] / [N, 1] single logits, in a floating-point dtype."""
    _check_output_tensor(name, out)
    ok = (out.dim() == 1 and out.shape[0] == n) or (out.dim() == 2 and out.shape[0] == n and out.shape[1] >= 1)
    if not ok:
        raise ValueError(
            f"{name}: expected the model to output [N, K] logits or [N] single logits for N={n} inputs, "
            f"got shape {tuple(out.shape)}"
        )
    return out


def probabilities_flag(out):
    """:func:`looks_like_probabilities` as a 0-D bool tensor on ``out``'s device, not read back (for a caller that
    reads it with other values), or None for outputs that are not [N, K] with K >= 2 and N >= 1."""
    if not (torch.is_tensor(out) and out.dim() == 2 and out.shape[0] and out.shape[1] > 1):
        return None
    # a half-precision softmax's entries are rounded to its resolution: its rows sum to 1 within about 0.4 of its
    # eps (measured for K = 2 to 1000), mostly past 1e-5, which decided by chance whether it was warned about
    tolerance = max(1e-5, torch.finfo(out.dtype).eps) if out.is_floating_point() else 1e-5
    out = out.detach().float()
    return (out >= 0).all() & ((out.sum(dim=1) - 1).abs().amax() < tolerance)


def looks_like_probabilities(out):
    """Whether [N, K] outputs (K >= 2, N >= 1) are non-negative rows summing to 1 (within 1e-5, or a half-precision
    output's eps): a model ending in a softmax, whose outputs the library's losses (softmax cross-entropy, the
    attacks') would saturate; logits never pass by chance."""
    flag = probabilities_flag(out)
    return flag is not None and bool(flag)


# [warned] while a caller that checks the outputs itself (evaluate, AutoAttack, ensemble) runs its attacks
_probabilities_scope = contextvars.ContextVar("robust_ops_probabilities_scope", default=None)
# where a warning's caller is not: this library, torch's decorators (no_grad), contextlib's (one_probabilities_warning)
_LIBRARY_DIRS = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep,
                 contextlib.__file__)


@contextlib.contextmanager
def one_probabilities_warning():
    """Inside, at most one :func:`warn_probabilities` warning, the first (evaluate's or AutoAttack's own check, or
    the first attack's first forward): the attacks of one evaluate or AutoAttack call do not each warn again.
    Nested scopes are the outermost's."""
    if _probabilities_scope.get() is not None:
        yield
        return
    token = _probabilities_scope.set([False])
    try:
        yield
    finally:
        _probabilities_scope.reset(token)


def probabilities_unwarned():
    """Whether a :func:`warn_probabilities` warning could still be given here (so the check is worth its compute)."""
    scope = _probabilities_scope.get()
    return scope is None or not scope[0]


def warn_probabilities(name):
    """The warning that the model's outputs look like probabilities (a final softmax), from ``name``, attributed to
    the caller's line outside the library (and torch's and contextlib's decorators), so that the default filter
    gives it once per call site, not once per batch; once per :func:`one_probabilities_warning` scope."""
    scope = _probabilities_scope.get()
    if scope is not None:
        if scope[0]:
            return
        scope[0] = True
    warn_outside(f"{name}: the model's outputs are non-negative and sum to 1 per sample, so they look like "
                 "probabilities; the attacks' losses expect logits (a softmax output saturates them and overestimates "
                 "robustness): remove the model's final softmax", _LIBRARY_DIRS)


def num_classes_of(out):
    return 2 if is_single_logit(out) else out.shape[1]


def predict_from_output(out):
    if is_single_logit(out):
        return (out.reshape(-1) > 0).long()
    return out.argmax(1)


def float32_or_wider(out):
    """``out`` for softmax and log arithmetic: half precision upcast to float32, float64 kept."""
    return out.to(torch.promote_types(out.dtype, torch.float32))


def classification_loss(out, y, reduction="mean"):
    """Cross-entropy for [N, K] logits, binary cross-entropy with logits for single-logit outputs; in float32 for
    float16 / bfloat16 outputs, as autocast computes it: in the half dtype 1 - p_y rounds to 0 for a confident sample
    (bfloat16: below 2**-9), and with it the true class's share of the gradient (docs/attacks.md)."""
    out = float32_or_wider(out)
    if is_single_logit(out):
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype), reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def two_logits(out):
    """[N, 2] logits equivalent to a single logit z (softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)])."""
    z = out.reshape(-1, 1)
    return torch.cat([torch.zeros_like(z), z], 1)


def best_other_logit(z, c):
    """max_{j != c} z_j per row of logits ``z`` [N, K], ``c`` LongTensor[N] (checked classes): class c set to -inf,
    not multiplied by (1 - onehot), which gives 0 instead of the true maximum when all logits are negative (a known
    bug elsewhere). Written with scatter: the mask from F.one_hot took seven more ops, two of them reads of the
    labels' range, in every step of the CW and targeted DLR losses and every Square query."""
    return z.scatter(1, c.view(-1, 1), float("-inf")).amax(1)


def margin(out, y, kappa=0.0):
    """Carlini-Wagner margin per sample: max(z_y - max_{j != y} z_j, -kappa); negative once misclassified."""
    z = two_logits(out) if is_single_logit(out) else out
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    return torch.clamp(true - best_other_logit(z, y), min=-kappa)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_not_half(name, x, why, dtypes=HALF_DTYPES):
    """A TypeError for inputs of ``dtypes`` (float16 / bfloat16), for attacks whose arithmetic needs more range or
    precision (``why``); under torch.autocast a half model takes float32 inputs, and every attack runs."""
    if torch.is_tensor(x) and x.dtype in dtypes:
        raise TypeError(f"{name}: {x.dtype} inputs are not supported ({why}); give float32 inputs -- a half-precision "
                        "model runs them under torch.autocast")


class _NoLabels:
    """The default of an attack's labels: none given (None is a value that is refused). Named, so that help() and
    inspect.signature show ``y=<no labels>``, not ``<object object at 0x...>``."""

    def __repr__(self):
        return "<no labels>"


_NO_LABELS = _NoLabels()


def past_bound(value, bound, side):
    """``value`` in 4 significant digits, or as many more as show it past ``bound`` when it is (``side`` 1: above,
    -1: below): at 4 digits an input at 1.00001 read "got values in [0.0001797, 1]" against the range [0.0, 1.0]."""
    for digits in range(4, 17):
        text = f"{value:.{digits}g}"
        if (float(text) - bound) * side > 0 or (value - bound) * side <= 0:
            return text
    return f"{value:.17g}"  # 17 significant digits give a float back exactly: past the bound when the value is


PIXEL_OVERSHOOT = 0.25  # how far past the range, as a part of its width, values are an overshoot of resampling
# CT Hounsfield units: air is -1000 (padding -1024 to -3024, -32768 in some exports), lung -900 to -500, bone and metal
# up to 3071 and past it. A bottom at or below this, against pixels' range, is no mean/std normalization of pixels
HOUNSFIELD_AIR = -500
HOUNSFIELD_WINDOWS = "e.g. -1000, 400 for lung or -160, 240 for soft tissue"


def pixel_scale(lo, hi, range_min, range_max):
    """What values ``lo`` .. ``hi`` outside [range_min, range_max] look like, as ``(kind, scale)``: the one rule of the
    refusals of check_inputs, evaluate and the .npz loader. ``("overshoot", None)``: at most a quarter of the range's
    width past either end (rounding or resampling: [0, 1.02], [-0.03, 1.04]; to clamp). Else, none negative:
    ``("8-bit", 255)`` or ``("high-bit", 4095 or 65535)`` for a top past 10 times the range's largest magnitude and at
    most a quarter past the scale (0-255 pixels, [0, 262] too; 12- or 16-bit intensities), ``("dark", 255)`` for a top
    up to that, where 255 lies past it (a dark 0-255 set, [0, 8], or data scaled otherwise, [0.1, 2.6] divided by a
    std: asked, as clamping would wipe either out). Else ``(None, None)``: negatives (a mean/std normalization, or
    other units: [-4, 48] against [-4, 4]), or a top past every scale; ``("hounsfield", None)`` for a bottom at or below
    HOUNSFIELD_AIR (and not below -32768, nor a top past 32767) against a range of magnitude 10 at most: CT Hounsfield
    units, read as a mean/std normalization until 2026-12-07. A top past 10 times [0, 1]'s, up to 255 times,
    was all the rule knew: [0, 8] was told to clip, [0, 262] 12- or 16-bit, [0, 255] against [-1, 1] to divide by
    255, which passes there in the wrong units."""
    width = range_max - range_min
    if not width > 0:
        return None, None
    if lo >= range_min - PIXEL_OVERSHOOT * width and hi <= range_max + PIXEL_OVERSHOOT * width:
        return "overshoot", None
    top = max(abs(range_min), abs(range_max))
    if lo < 0:
        hounsfield = top <= 10 and -32768 <= lo <= HOUNSFIELD_AIR and hi <= 32767
        return ("hounsfield", None) if hounsfield else (None, None)
    if hi <= 10 * top:
        return ("dark", 255) if 255 > 10 * top else (None, None)
    scale = next((s for s in (255, 4095, 65535) if s > 10 * top and hi <= (1 + PIXEL_OVERSHOOT) * s), None)
    return (None, None) if scale is None else ("8-bit" if scale == 255 else "high-bit", scale)


def pixel_map(scale, range_min, range_max):
    """The expression mapping intensities of ``scale`` (their top: 255, 4095, 65535) onto [range_min, range_max]:
    ``x.float() / 255`` for [0, 1], ``x.float() / 255 * 2 - 1`` for [-1, 1]."""
    return onto_range(f"x.float() / {scale}", range_min, range_max)


def onto_range(text, range_min, range_max):
    """The expression ``text`` (of values in [0, 1]) mapped onto [range_min, range_max]."""
    if range_max - range_min != 1:
        text += f" * {range_max - range_min:g}"
    if range_min:
        text += f" {'+' if range_min > 0 else '-'} {abs(range_min):g}"
    return text


def hounsfield_shift_fix(lo, shift):
    """The alternative to a Hounsfield window for values of a bottom ``lo`` above air's -1000: a crop inside the
    body (lung -900 to -500), or data with an offset or its mean subtracted ([-600, 600]), which a window such as
    -160, 240 would clip: ``shift`` (an expression of x, lo and hi) as the fix, "" for a bottom at or below air. One
    text for the attacks', evaluate's and the .npz loader's fixes (float and integer images); an attack's and
    evaluate's fix left it out until 2026-12-07, so the same [-600, 600] got two pieces of advice."""
    if not lo > -1000:
        return ""
    return (f"; else (an offset or a mean subtracted) {shift}, lo and hi the lowest and highest value of every split "
            "together")


def value_range_fix(lo, hi, range_min, range_max, normalize, clamp):
    """The fix check_inputs' and evaluate's refusals of values ``lo`` .. ``hi`` outside [range_min, range_max] name,
    by :func:`pixel_scale`: pixels of a bit depth mapped onto the range (divided by their scale's top for [0, 1];
    x / 255 gives [0, 1], outside other ranges or inside them in the wrong units), a dark set asked whether it is
    0-255 pixels or else to ``normalize`` (the caller's fix of normalizing inside the model), else ``normalize`` and
    ``clamp`` (the caller's clamp of an overshoot)."""
    kind, scale = pixel_scale(lo, hi, range_min, range_max)
    if kind in (None, "overshoot"):
        return normalize + clamp
    units = "the attacks' radii and clip range are in the value range's units"
    if kind == "hounsfield":  # told to normalize inside the model: Normalized's inputs are still outside the range
        window = onto_range("(x.clamp(lo, hi) - lo) / (hi - lo)", range_min, range_max)
        return (f"CT Hounsfield units? window them onto the value range [{range_min}, {range_max}]: {window} for "
                f"the window [lo, hi] they are read in ({HOUNSFIELD_WINDOWS})"
                f"{hounsfield_shift_fix(lo, onto_range('(x - lo) / (hi - lo)', range_min, range_max))}: {units}")
    unit = (range_min, range_max) == (0, 1)
    expr = pixel_map(scale, range_min, range_max)
    then = f"; then x.clamp({range_min}, {range_max}) for the overshoot past {scale}" if hi > scale else ""
    onto = f"map them onto the value range [{range_min}, {range_max}] ({expr}{then})"
    if kind == "dark":
        return (f"a dark set of 0-255 pixels? {f'divide them by 255 ({expr})' if unit else onto}; data scaled "
                f"otherwise (divided by a std)? {normalize} -- a clamp would wipe them out")
    if kind == "8-bit":
        how = f"divide them by 255 ({expr}, as torchvision's ToTensor does{then})" if unit else onto
        return f"8-bit pixels? {how}: {units}"
    if unit:
        return ("12- or 16-bit intensities? divide them by their scale's top (x.float() / 4095 for 12 bits, "
                f"x.float() / 65535 for 16; x / 255 leaves them outside): {units}")
    return (f"12- or 16-bit intensities? map them onto the value range [{range_min}, {range_max}] ("
            f"{pixel_map(4095, range_min, range_max)} for 12 bits, {pixel_map(65535, range_min, range_max)} for 16"
            f"): {units}")


def _array_like(value):
    """Whether ``value`` is a numpy array, list or tuple: values torch.as_tensor converts, which the input and label
    refusals name the conversion for."""
    return isinstance(value, (list, tuple)) or type(value).__module__ == "numpy"


def _array_labels_fix(y):
    """The fix for labels ``y`` given as a numpy array, list or tuple: torch.as_tensor converts numbers, but not class
    names (a list of strings: "too many dimensions 'str'") nor a numpy object array (a pandas column's .to_numpy():
    "can't convert np.ndarray of type numpy.object_"), which the generic fix sent to it."""
    items = y.reshape(-1) if hasattr(y, "reshape") else y
    if len(items) and isinstance(items[0], str):
        return "; class names? map each name to its index, 0 to K-1"
    if getattr(y, "dtype", None) == object:
        return "; convert them with torch.as_tensor(y.astype(np.int64))"
    if isinstance(y, (list, tuple)):  # float or bool numbers: torch.as_tensor(y) alone was refused next for its dtype
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as err:  # [None, None], ragged rows, 2**70: told the same call
            return f"; they are no list of class numbers (torch.as_tensor(y) says: {str(err).splitlines()[0]})"
    return label_dtype_fix(y, "torch.as_tensor(y).long()") or "; convert them with torch.as_tensor(y)"


def check_input_batch(name, x):
    """``x`` must be a floating-point tensor with a batch dimension: check_inputs' first rule, and the one the
    defenses apply before reading the batch size (a list of images failed with "'list' object has no attribute
    'shape'")."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        # a numpy array's dtype alone ("got float32") read as if the tensor were fine: name its type
        # a numpy array or a list was named with no way to a tensor; torch.as_tensor of a list of image tensors (a
        # dataset's samples) fails ("only one element tensors can be converted to Python scalars")
        fix = ("; a list of tensors? stack them with torch.stack(x)"
               if isinstance(x, (list, tuple)) and x and torch.is_tensor(x[0]) else
               "; convert it with torch.as_tensor(x, dtype=torch.float32)" if _array_like(x) else "")
        raise TypeError(f"{name}: expected x to be a floating-point tensor, got "
                        f"{x.dtype if torch.is_tensor(x) else type(x)}{fix}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected x to have a batch dimension, got a 0-D tensor")


def check_inputs(name, x, y=_NO_LABELS, clip_min=0.0, clip_max=1.0, label_range=False):
    """Inputs must be finite and inside the clip range; labels an integer tensor [N], none negative (their upper
    bound, the model's class count, is checked at the model's first output). Nothing is clamped silently. Returns y
    as int64 (None when y is not given, for callers without labels; a y of None is refused like any other
    non-tensor, where atk(x, None) passed and failed later with "'NoneType' object has no attribute 'numel'"): callers
    attack with the returned labels. ``label_range``: return ``(y, (min, max))``, the labels' range as Python ints
    (None for no labels) read once here, for ``check_labels_against`` to check the model's class count without
    reading the labels again."""
    check_input_batch(name, x)
    if torch.is_tensor(y) and y.device != x.device:  # torch's error came from inside the loss, after the forward
        raise ValueError(f"{name}: expected y on x's device {x.device}, got y on {y.device}; pass y.to(x.device)")
    # as IMA's and the defenses': None or a string met math.isfinite's bare TypeError, and True ran as 1.0
    clip_min = check_real(name, "clip_min", clip_min)
    clip_max = check_real(name, "clip_max", clip_max, minimum=clip_min)
    if x.numel() and not recorded_within(x, clip_min, clip_max):  # a part of inputs the cascade checked: not read
        # one reduction and one host read (a sync on a GPU) for both checks: min and max propagate NaN, so both are
        # finite only when every value is. isfinite(x).all() beside min and max cost three reads and, on CPU, ~6x the
        # time of the two reductions together (once per attack call). detach: reading values of an input that
        # requires grad would warn
        lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteInputError(f"{name}: x contains NaN or Inf")
        if lo < clip_min or hi > clip_max:
            crossed = (f"{past_bound(hi, clip_max, 1)} > clip_max {clip_max}" if hi > clip_max else
                       f"{past_bound(lo, clip_min, -1)} < clip_min {clip_min}")
            # 0-255 pixels were told to normalize inside the model or clamp, neither of which gives [0, 1] pixels
            fix = value_range_fix(lo, hi, clip_min, clip_max,
                                  "normalize inside the model, e.g. with robust_ops.attacks.Normalized",
                                  ", or clamp inputs that overshoot only by rounding or resampling, "
                                  f"x.clamp({clip_min}, {clip_max})")
            raise ValueError(f"{name}: expected x inside the clip range [{clip_min}, {clip_max}], got values in "
                             f"[{past_bound(lo, clip_min, -1)}, {past_bound(hi, clip_max, 1)}] ({crossed}; {fix})")
    if y is _NO_LABELS:
        return (None, None) if label_range else None
    return check_class_labels(name, y, x.shape[0], label_range=label_range, x=x)


def check_class_labels(name, y, n, label_range=False, x=None):
    """Labels an integer tensor [n] (any integer dtype: converted losslessly to int64, which cross-entropy, one_hot and
    gather take), none negative: the attacks' and the defenses' label rule. Float, bool and complex labels are a
    TypeError (0.7 would become 0 silently); the upper bound is the model's output's (check_labels_against).
    ``label_range``: return ``(y, (min, max))`` (None for no labels, or labels a :func:`values_within` block
    bounds, which are not read). ``x``: the inputs, whose shape the refusal of one label beside n > 1 names."""
    if segmentation_masks(y):  # before the dtype: a float mask's dtype error only led to the shape error
        raise ValueError(f"{name}: expected y of shape [{n}], got {tuple(y.shape)}: segmentation masks? "
                         "the attacks are for classifiers only (segmentation: docs/ima.md, Segmentation)")
    if not torch.is_tensor(y) or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        # numpy labels (a metadata table's column) or a list: a tensor's fix (.long()) does not apply to them, and
        # integer ones were named with no fix at all
        fix = _array_labels_fix(y) if _array_like(y) else label_dtype_fix(y)
        raise TypeError(f"{name}: expected y to be an integer tensor of class labels, got "
                        f"{y.dtype if torch.is_tensor(y) else type(y)}{fix}")
    y = y.long()  # a no-op (same tensor) for int64
    if y.is_inference() and not torch.is_inference_mode_enabled():
        # labels made under torch.inference_mode() (a data pipeline's) cannot be saved for the loss's backward:
        # PGD failed with autograd's "Inference tensors cannot be saved for backward"; a clone is a normal tensor
        y = y.clone()
    if y.dim() != 1 or y.shape[0] != n:
        # MedMNIST ships labels as [N, 1] (fit and evaluate take them): say the one-call fix
        hint = "; pass y.view(-1) (MedMNIST's [N, 1] labels)" if tuple(y.shape) == (n, 1) else ""
        if y.dim() == 0:  # one sample's label (dataset[i]): an image [C, H, W] beside it read as C samples
            hint = ("; y is one label: give one per sample, for a single sample y.view(1) with x as a batch of one "
                    "(x.unsqueeze(0) for an image [C, H, W])")
        elif tuple(y.shape) == (1,) and x is not None:  # one label beside one image [C, H, W], read as C samples
            hint = (f"; x of shape {tuple(x.shape)} is one sample without its batch dimension? pass x.unsqueeze(0) "
                    "(an image [C, H, W] is read as C samples)")
        raise ValueError(f"{name}: expected y of shape [{n}], got {tuple(y.shape)}{hint}")
    if range_read_before(y) is None and recorded_within(y, 0, math.inf):
        # a part of labels the cascade checked: none negative, and check_labels_against reads the top with its count
        # of non-finite output rows, where the model's class count is known
        return (y, None) if label_range else y
    # both ends in one host read (a sync on a GPU): min and max were a read each, and check_labels_against's max a
    # third once the model's class count was known
    lo_hi = labels_range(y)
    if lo_hi is not None and lo_hi[0] < 0:
        raise ValueError(f"{name}: expected labels non-negative, got values in [{lo_hi[0]}, {lo_hi[1]}]")
    return (y, lo_hi) if label_range else y


# [(labels, their version, (min, max))] read in the current labels_read_once scope (fit's step, a defense's call)
_ranges_read = contextvars.ContextVar("robust_ops_ranges_read", default=None)


@contextlib.contextmanager
def labels_read_once():
    """Inside, labels_range reads each label tensor once: fit's check, the defense's labels() and its attack's input
    check (and check_labels_against) each read the labels' range, a host read (a GPU sync) apiece per training
    step. A tensor changed in place since (its version) is read again; writes that bypass the version counter
    (through ``.data`` or ``.numpy()``) are not seen, as for autograd. Nested scopes are the outermost's."""
    if _ranges_read.get() is not None:
        yield
        return
    token = _ranges_read.set([])
    try:
        yield
    finally:
        _ranges_read.reset(token)


def range_read_before(y):
    """The (min, max) labels_range read of ``y`` in this labels_read_once scope, unchanged since; else None."""
    read = _ranges_read.get()
    if read and not y.is_inference():  # inference tensors have no version counter
        for labels, version, lo_hi in read:
            if labels is y and version == y._version:
                return lo_hi
    return None


def labels_range(y):
    """(min, max) of integer labels ``y`` as Python ints, in one host read (none where this labels_read_once scope
    read them already); None for no labels."""
    if not y.numel():
        return None
    lo_hi = range_read_before(y)
    if lo_hi is None:
        lo_hi = tuple(torch.stack(torch.aminmax(y)).tolist())
        range_known(y, lo_hi)
    return lo_hi


def range_known(y, lo_hi):
    """Record ``lo_hi`` as the (min, max) of labels ``y`` (as labels_range read them, or labels a caller made, such as
    PGDDefense.ascend's zeros) for the rest of this labels_read_once scope; outside one, nothing."""
    read = _ranges_read.get()
    if read is not None and not y.is_inference():
        read.append((y, y._version, lo_hi))


# ((tensor, its version, (lo, hi)), ...) of the values_within blocks running: every value finite and in [lo, hi]
_bounds = contextvars.ContextVar("robust_ops_bounds", default=())


@contextlib.contextmanager
def values_within(*known):
    """Inside, check_inputs takes each tensor ``t`` of ``known``'s ``(t, lo, hi)`` as finite and in [lo, hi] while it
    is unchanged (its version), and reads back neither an input's nor a label's range whose bounds pass its checks:
    the cascade checks its x and y once, and each attack call on a part of them read the part's ranges back again
    (two host reads, GPU syncs, per call). Bounds that do not pass (an attack with a narrower clip range, a model
    with fewer classes) are read exactly, for the error's values."""
    token = _bounds.set(_bounds.get() + tuple((t, t._version, (lo, hi)) for t, lo, hi in known
                                              if not t.is_inference()))  # inference tensors have no version counter
    try:
        yield
    finally:
        _bounds.reset(token)


def recorded_bounds(t):
    """The (lo, hi) a :func:`values_within` block running gave ``t``, unchanged since; else None."""
    if not t.is_inference():
        for known, version, lo_hi in _bounds.get():
            if known is t and version == t._version:
                return lo_hi
    return None


def recorded_within(t, lo, hi):
    """Whether a :func:`values_within` block running gave ``t`` (unchanged since) bounds inside [lo, hi]."""
    bounds = recorded_bounds(t)
    return bounds is not None and lo <= bounds[0] and bounds[1] <= hi


def check_attack_output(what, adv, x, clip_min, clip_max, eps=None, norm=None):
    """An attack's result must be inputs like ``x``: same shape, finite, inside the clip range. A NaN or out-of-range
    point would otherwise be scored as an adversarial example (robustness understated, silently). ``what`` names
    the attack in the message. ``eps`` and ``norm`` given: floating-point points are also checked as
    :func:`check_inside_ball` checks them, on the same host read (the cascade read each attack call's twice)."""
    if not torch.is_tensor(adv) or adv.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(getattr(adv, 'shape', ()))} for inputs of shape "
                         f"{tuple(x.shape)}")
    if not adv.numel():
        return
    ball = _ball_excess(adv, x, eps, norm) if adv.is_floating_point() else None
    # one host read (a sync on a GPU) of both ends, as check_inputs': min and max propagate NaN, so both are finite
    # only when every value is (isfinite(adv).all(), min and max were three reads per attack call)
    ends = torch.aminmax(adv.detach())
    if ball is None:
        lo, hi = (float(v) for v in torch.stack(ends).tolist())
        outside = 0
    else:  # with the count of points outside the ball, in the ball check's dtype (the ends exactly)
        lo, hi, outside = torch.stack([*(v.to(ball[0].dtype) for v in ends), ball[2].sum().to(ball[0].dtype)]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi) and lo >= clip_min and hi <= clip_max):
        raise ValueError(f"{what} returned points with NaN/Inf or outside the clip range [{clip_min}, {clip_max}]; "
                         f"it must return valid inputs")
    if outside:
        _outside_ball(what, norm, *ball)
    elif ball is None and not adv.is_floating_point():
        check_inside_ball(what, adv, x, eps, norm)


def check_inside_ball(what, adv, x, eps, norm):
    """An attack's points must lie in its ``norm`` ball ("linf", "l2" or "l1") of radius ``eps`` (a number or one per
    sample) around ``x``: one outside would be scored as an adversarial example at a radius it does not respect
    (robustness understated, silently; your own attack class may return anything). Allowed beyond ``eps``: a relative
    1e-5 (the projection's own rounding) and the rounding of each entry to the points' dtype, one ulp of the larger
    magnitude per entry (summed over entries in the norm's way). ``what`` names the attack in the message."""
    ball = _ball_excess(adv, x, eps, norm)
    if ball is not None and bool(ball[2].any()):
        _outside_ball(what, norm, *ball)


def _ball_excess(adv, x, eps, norm):
    """(distance, radius, outside) per sample of :func:`check_inside_ball`'s rule, not read back (None where it
    checks nothing)."""
    n = adv.shape[0] if adv.dim() else 0
    if adv.numel() == 0 or eps is None or norm not in ("linf", "l2", "l1"):
        return None
    # in float32 at least (float64 kept): a float64 copy of a batch of 224x224 images cost 8 bytes an entry
    work = adv.dtype if adv.dtype in (torch.float32, torch.float64) else torch.float32
    delta = (adv.detach().to(work) - x.detach().to(work)).reshape(n, -1)
    entries = delta.shape[1]
    if norm == "linf":
        dist, spread = delta.abs().amax(1), 1.0
    elif norm == "l2":
        dist, spread = delta.norm(dim=1), entries ** 0.5
    else:
        dist, spread = delta.abs().sum(1), float(entries)
    scale = torch.maximum(adv.detach().abs(), x.detach().abs()).reshape(n, -1).amax(1).to(work).clamp_min(1.0)
    radius = torch.as_tensor(eps, dtype=work, device=dist.device).reshape(-1).expand(n)
    limit = radius * (1 + 1e-5) + torch.finfo(adv.dtype).eps * scale * spread
    return dist, radius, dist > limit


def _outside_ball(what, norm, dist, radius, outside):
    """check_inside_ball's refusal of the points ``outside`` (some are)."""
    worst = int((dist - radius).argmax())
    raise ValueError(f"{what} returned {int(outside.sum())} of {outside.shape[0]} points outside the {norm} ball "
                     f"around x (sample {worst}: distance {float(dist[worst]):.6g}, radius "
                     f"{float(radius[worst]):.6g}); it must project onto the ball of the eps it is given")


def check_gradients_possible(name, refused="gradient-based attacks cannot run", enabler="the attack"):
    """Gradient attacks differentiate the model inside ``torch.enable_grad()``, which ``torch.no_grad()`` allows but
    ``torch.inference_mode()`` does not (its tensors never record a graph): refuse it by name, not with autograd's
    "element 0 of tensors does not require grad" from inside the attack. GR and LLR, whose input gradient is no
    attack, say so through ``refused`` and ``enabler``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name}: {refused} under torch.inference_mode(); call it outside that block "
                           f"(torch.no_grad() is fine: {enabler} enables gradients itself)")


def autocast_dtype(device_type):
    """The dtype autocast computes in on ``device_type`` ("cuda", "cpu"), None when it is off."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None  # "meta" has no autocast: torch raises


def fp16_autocast(device_type):
    """Whether float16 autocast is on for ``device_type`` ("cuda", "cpu"): ``fit(amp=True)`` runs every defense, and
    the attacks inside it, under it."""
    return autocast_dtype(device_type) == torch.float16


class InputGradScale:
    """``torch.autograd.grad(objective, inputs)`` for the attacks' input gradients (and any parameter gradients taken
    in the same pass), loss-scaled under float16 autocast.

    Under float16 autocast the backward runs through float16 activations, and GradScaler scales only the training
    loss: an attack objective's gradients underflow to 0 for confident samples (dL/dlogit ~1e-6 over a mean loss;
    float16's smallest subnormal is 6e-8), so PGD left them unattacked (measured: 36% of samples of a resnet18 on
    BreastMNIST had an all-zero gradient at batch 128; docs/attacks.md). Here the objective is multiplied by a power
    of two ``value`` (GradScaler's initial 2**16) before the backward and the gradients divided by it afterwards in
    their own dtype (float32 inputs and parameters: exact); a non-finite result (float16 overflow) halves ``value``
    and redoes the backward on the retained graph, down to 1 (the unscaled gradient, returned as is). ``value`` carries
    over to the next call, so one attack's steps pay for an overflow once. Without float16 autocast this is exactly
    ``torch.autograd.grad`` (float32 results bitwise unchanged), but for float16 inputs whose gradient the caller
    uses only for its direction (``direction_only``): a ``model.half()`` fed float16 inputs underflows the same way,
    with no autocast (measured: PGD and APGD broke 0 of 16 confident samples that float32 broke all of)."""

    initial = 2.0 ** 16

    def __init__(self):
        self.value = self.initial
        self.retries = 0  # backwards redone after an overflow (tests, benchmarks)
        self.first_scale = 1.0  # the factor the last call's first gradient carries (not 1: direction_only's)
        self.retain_graph = True  # False once a torch.compile'd model's backward refused to keep its graph

    def grad(self, objective, inputs, create_graph=False, allow_unused=False, direction_only=False):
        """allow_unused: None for an input the objective does not depend on (torch.autograd.grad's).
        direction_only: the caller uses the first input's gradient only for its direction (sign or normalized
        steps). A float16 first input (a ``model.half()`` attacked in its own dtype) is then loss-scaled as under
        float16 autocast, and its gradient comes back still multiplied by the scale (a power of two): divided back
        in float16, a confident sample's gradient underflows to 0 again. The other inputs' gradients are unscaled."""
        inputs = list(inputs)
        keep_scaled = direction_only and inputs[0].dtype == torch.float16
        self.first_scale = 1.0
        if not (keep_scaled or fp16_autocast(inputs[0].device.type)):
            return torch.autograd.grad(objective, inputs, create_graph=create_graph, allow_unused=allow_unused)
        # a float16 objective times 2**16 would overflow before any backward (float64 stays float64)
        objective = objective.to(torch.promote_types(objective.dtype, torch.float32))
        while True:
            scale = self.value
            grads = self._scaled_backward(objective * scale, inputs, create_graph, allow_unused)
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads if g is not None]).all())
            if finite or scale <= 1.0:
                self.first_scale = scale if keep_scaled else 1.0
                return tuple(g if g is None or scale == 1.0 or (i == 0 and keep_scaled) else g / scale
                             for i, g in enumerate(grads))
            if not self.retain_graph:
                raise RuntimeError(
                    f"InputGradScale: the float16 loss-scaled input gradient overflowed at scale {scale:g}, and the "
                    "backward of a torch.compile'd model cannot be redone at a smaller one (AOTAutograd's donated "
                    "buffers free its graph): set torch._functorch.config.donated_buffer = False before compiling, "
                    "or attack the model uncompiled or in float32")
            self.value = scale / 2
            self.retries += 1

    def _scaled_backward(self, scaled, inputs, create_graph, allow_unused):
        # retain_graph: an overflow redoes this backward at a smaller scale. A torch.compile'd model's backward with
        # donated buffers (AOTAutograd's default) refuses a retained graph before it runs ("compiled with non-empty
        # donated buffers which requires ... retain_graph=False"): APGD, IMA and half-model attacks on a compiled
        # model stopped there. The graph is intact then, so the backward runs once more without keeping it.
        if self.retain_graph:
            try:
                return torch.autograd.grad(scaled, inputs, retain_graph=True, create_graph=create_graph,
                                           allow_unused=allow_unused)
            except RuntimeError as err:
                if "donated buffers" not in str(err):
                    raise
                self.retain_graph = False
        return torch.autograd.grad(scaled, inputs, create_graph=create_graph, allow_unused=allow_unused)
