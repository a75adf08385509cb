"""robust_ops.native_layers: max pooling and the eval-mode batch-norm backward on faster code with bitwise-identical
results, applied only while active, nested safely, and never where it would change anything."""

import functools
import itertools
import types

import numpy
import pytest
import torch
import torchvision
from torch import nn

from robust_ops import _patching, attacks
from robust_ops.memory import cpu_memory_pool_stats
from robust_ops.native_layers import ENV_SWITCH, library_speedups, native_layers
from robust_ops.prepacked_conv import prepacked_conv_active

from utils import TinyCNN, run_python


def patched(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


def eval_bn(c, dtype=torch.float32, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine).to(dtype)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 1e-3)
    if affine:
        bn.weight.data.copy_(torch.randn(c, generator=g))
        bn.bias.data.copy_(torch.randn(c, generator=g))
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    return bn.eval()


def output_and_input_grad(model, x, grad):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (g,) = torch.autograd.grad(out, x, grad)
    return out, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 5, 7, 9), (1, 3, 1, 1), (2, 64, 16, 16), (3, 17, 1, 33)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_eval_batch_norm_backward_is_bitwise_atens(dtype, shape, affine, layout):
    bn = eval_bn(shape[1], dtype, affine)
    x = (torch.randn(shape, dtype=dtype) * 3).contiguous(memory_format=layout)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
    ref_out, ref_grad = output_and_input_grad(bn, x, grad)
    with native_layers(bn):
        assert patched(bn) == [bn]
        out, g = output_and_input_grad(bn, x, grad)
        assert out.grad_fn is not None and "EvalBatchNorm" in type(out.grad_fn).__name__
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)
    assert g.stride() == ref_grad.stride()  # channels_last stays channels_last, as ATen's
    assert patched(bn) == []


@pytest.mark.parametrize("shape", [(4, 5, 6, 4), (2, 3, 1, 1), (2, 1, 4, 5), (0, 3, 4, 5)])
def test_eval_batch_norm_input_gradient_takes_atens_layout_whatever_grad_outputs(shape):
    """The input gradient took grad_output's layout (the kernel keeps a channels_last one and makes any other
    contiguous), ATen's takes the input's: an NCHW input given a channels_last gradient got strides (120, 1, 24, 4)
    against ATen's (120, 30, 6, 1), a channels_last one given an NCHW or expanded gradient NCHW strides; the values
    were equal. Now grad_output is put in the input's layout first, a copy only where the two differ (in place of
    the kernel's own for an expanded one), and the inputs where ATen's choice also follows grad_output's strides
    run ATen's batch norm: channels_last strides that are NCHW too (N x C x 1 x 1, C = 1) and empty inputs (found by
    the small-leftovers helper)."""
    from torch.profiler import ProfilerActivity, profile

    bn = eval_bn(shape[1])
    cl = torch.channels_last
    channels_last = lambda: torch.empty(shape, memory_format=cl).copy_(torch.randn(shape))  # noqa: E731
    inputs = {"nchw": torch.randn(shape), "channels_last": channels_last()}
    grads = {"nchw": torch.randn(shape), "channels_last": channels_last(), "expanded": torch.tensor(0.5).expand(shape)}
    for (x_layout, x), (grad_layout, grad) in itertools.product(inputs.items(), grads.items()):
        _, ref = output_and_input_grad(bn, x, grad)
        with native_layers(bn):
            x = x.detach().clone().requires_grad_()
            out = bn(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                (g,) = torch.autograd.grad(out, x, grad)
        case = (x_layout, grad_layout, g.stride(), ref.stride())
        assert torch.equal(g, ref) and g.stride() == ref.stride(), case
        if shape == (4, 5, 6, 4):  # the fast path, copying only a grad_output in another layout
            assert "EvalBatchNorm" in type(out.grad_fn).__name__, case
            assert [e.name for e in prof.events()].count("aten::copy_") == (x_layout != grad_layout), case


def test_batch_norm_follows_parameter_statistics_eps_and_dtype_updates():
    bn = eval_bn(4)
    x, grad = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)

    def assert_native_is_atens():
        with native_layers(bn):
            out, g = output_and_input_grad(bn, x, grad)
        ref_out, ref_grad = output_and_input_grad(bn, x, grad)
        assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)

    assert_native_is_atens()
    bn.weight.data.mul_(-2)  # in place: a new version of the same tensor
    bn.running_var.mul_(1.7)
    assert_native_is_atens()
    bn.eps = 0.1  # the cached invstd depends on eps too
    assert_native_is_atens()
    bn.double()  # the same variance values in float64 (torch.equal across dtypes holds): not the float32 invstd
    x, grad = x.double(), grad.double()
    assert_native_is_atens()


def test_batch_norm_follows_running_statistics_a_training_step_updates():
    """A train-mode forward updates running_var in place without bumping its version counter: the eval-mode
    backward of the next attack must still use the new statistics (as in IMA, where GenAdv runs between steps)."""
    bn = eval_bn(4)
    bn.weight.requires_grad_(True)
    bn.bias.requires_grad_(True)
    x, grad = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)

    def attack_gradient():
        bn.eval()
        for p in bn.parameters():
            p.requires_grad_(False)
        try:
            return output_and_input_grad(bn, x, grad)
        finally:
            for p in bn.parameters():
                p.requires_grad_(True)

    with native_layers(bn):
        attack_gradient()  # fills the cache
        version = bn.running_var._version
        bn.train()
        bn(torch.randn(8, 4, 3, 3) * 5).sum().backward()  # a training step's forward: new running statistics
        assert bn.running_var._version == version  # (why a version-keyed cache went stale)
        out, g = attack_gradient()
    ref_out, ref_grad = attack_gradient()
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)


def test_batch_norm_falls_back_where_the_fast_path_would_differ():
    bn = eval_bn(3)
    x = torch.randn(2, 3, 4, 4)
    with native_layers(bn):
        bn.weight.requires_grad_(True)  # a weight gradient is wanted: ATen's full backward
        out = bn(x.requires_grad_())
        assert "EvalBatchNorm" not in type(out.grad_fn).__name__
        bn.weight.requires_grad_(False)
        bn.train()  # batch statistics
        assert "EvalBatchNorm" not in type(bn(x).grad_fn).__name__
        bn.eval()
        strided = torch.randn(2, 3, 4, 8)[..., ::2].requires_grad_()  # neither NCHW nor channels_last
        assert "EvalBatchNorm" not in type(bn(strided).grad_fn).__name__
        with torch.no_grad():
            assert torch.equal(bn(x), nn.BatchNorm2d.forward(bn, x))


@pytest.mark.parametrize("trained", ["weight", "bias"])
def test_batch_norm_whose_weight_or_bias_needs_a_gradient_gets_it(trained):
    # (mutation testing of native_layers: checking the weight alone survived) the one-pass backward gives the
    # input gradient only: a bias that needs one must take ATen's backward, or its gradient is lost
    bn, x, grad = eval_bn(3), torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    param = getattr(bn, trained).requires_grad_(True)
    expected = torch.autograd.grad(bn(x), (x, param), grad)
    with native_layers(bn, True):
        got = torch.autograd.grad(bn(x), (x, param), grad)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def batch_norm_outcome(bn, x):
    """The batch norm's output and input gradient (for a gradient of ones), or the first line of its error."""
    try:
        return output_and_input_grad(bn, x, torch.ones_like(x))
    except (RuntimeError, ValueError) as err:
        return str(err).splitlines()[0]


def test_batch_norm_cases_it_does_not_take_give_atens_results_and_errors():
    x = torch.randn(2, 3, 4, 4)
    float64_statistics = eval_bn(3)
    float64_statistics.running_mean = float64_statistics.running_mean.double()
    float64_statistics.running_var = float64_statistics.running_var.double()
    no_running_mean = eval_bn(3)
    no_running_mean.running_mean = None
    # (mutation testing of native_layers: dropping the running variance's None check survived) without it the
    # dtype check failed with "'NoneType' object has no attribute 'dtype'" where ATen names the missing statistic
    no_running_var = eval_bn(3)
    no_running_var.running_var = None
    # (mutation testing of native_layers) only the running variance's dtype was checked: a float64 running mean
    # took the fast path and failed in its invstd read, with another message than ATen's
    float64_running_mean = eval_bn(3)
    float64_running_mean.running_mean = float64_running_mean.running_mean.double()
    # statistics on another device than the input (a model moved in parts, a batch norm left on a GPU; meta here):
    # until 2026-12-05 the invstd cache compared them with those of a CPU run (aten::equal's multi-line error)
    moved = eval_bn(3)
    with native_layers(moved):
        batch_norm_outcome(moved, x)
    moved.to("meta")
    cases = {
        "3-D input": (eval_bn(3), x[0]),
        "bfloat16": (eval_bn(3, torch.bfloat16), x.bfloat16()),
        "no running statistics": (nn.BatchNorm2d(3, track_running_stats=False).eval().requires_grad_(False), x),
        "float64 running statistics": (float64_statistics, x),
        "float64 running mean": (float64_running_mean, x),
        # a running variance without a running mean: ATen refuses it (reading invstd off its backward segfaulted)
        "no running mean": (no_running_mean, x),
        "no running variance": (no_running_var, x),
        "statistics on another device": (moved, x),
    }
    for name, (bn, inp) in cases.items():
        expected = batch_norm_outcome(bn, inp)
        with native_layers(bn):
            got = batch_norm_outcome(bn, inp)
        if isinstance(expected, str):
            assert got == expected, name
        else:
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), name


def test_batch_norm_on_other_devices_runs_its_own_forward():
    bn = eval_bn(3).to("meta")  # any device but the CPU; meta needs no GPU
    x = torch.randn(2, 3, 4, 4, device="meta", requires_grad=True)
    with native_layers(bn):
        out = bn(x)
    assert "EvalBatchNorm" not in type(out.grad_fn).__name__


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)], ids=str)
def test_max_pool_runs_the_native_op_with_identical_results(pool):
    x = torch.randn(4, 8, 20, 21)
    grad = torch.randn(pool(x).shape)
    ref_out, ref_grad = output_and_input_grad(pool, x, grad)
    with native_layers(pool):
        out, g = output_and_input_grad(pool, x, grad)
        assert "max_pool2d" in type(out.grad_fn).__name__ and "robust_ops" in type(out.grad_fn).__name__
        assert torch.equal(pool(input=x), ref_out)  # keyword arguments reach the replacement
        pool.return_indices = True
        (o, i), (ro, ri) = pool(x), nn.MaxPool2d.forward(pool, x)
        assert torch.equal(o, ro) and torch.equal(i, ri)
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)


@pytest.mark.parametrize("sizes", [
    dict(kernel_size=torch.tensor(3), stride=torch.tensor([2])), dict(kernel_size=(torch.tensor(3), numpy.int64(2))),
    dict(kernel_size=3, stride=(numpy.array(2), 1), padding=torch.tensor(1, dtype=torch.int32)),
], ids=["tensors", "tensor-and-numpy-int", "numpy-array-and-int32-tensor"])
def test_max_pool_sizes_given_as_integer_tensors_run_as_in_aten(sizes):
    # F.max_pool2d takes one-element integer tensors and 0-D integer arrays as sizes; max_pool2d refused them, so a
    # model with such an nn.MaxPool2d ran outside attacks and raised a TypeError inside them (native layers on).
    pool = nn.MaxPool2d(**sizes)
    x = torch.randn(3, 4, 11, 10)
    grad = torch.randn(pool(x).shape)
    ref_out, ref_grad = output_and_input_grad(pool, x, grad)
    with native_layers(pool, True):
        out, g = output_and_input_grad(pool, x, grad)
        assert "robust_ops" in type(out.grad_fn).__name__
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resnet18_gradients_bitwise_equal(layout):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval().to(memory_format=layout)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(16, 3, 40, 40)
    grad = torch.randn(16, 2)
    ref_out, ref_grad = output_and_input_grad(model, x, grad)
    with native_layers(model):
        assert len(patched(model)) == 21  # 1 max pool + 20 batch norms
        out, g = output_and_input_grad(model, x, grad)
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)
    assert patched(model) == []


def test_second_order_gradients_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), eval_bn(4, torch.float64), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.LazyLinear(2)).double()
    model(torch.zeros(1, 1, 10, 10, dtype=torch.float64))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(3, 1, 10, 10, dtype=torch.float64)

    def grad_penalty_grad():
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xx).square().sum(), xx, create_graph=True)
        return torch.autograd.grad(g.square().sum(), xx)[0]

    ref = grad_penalty_grad()
    with native_layers(model):
        assert torch.allclose(grad_penalty_grad(), ref, rtol=1e-12, atol=1e-12)


def test_nesting_and_exceptions_restore_the_modules():
    model = TinyCNN()
    with native_layers(model):
        with native_layers(model):
            assert len(patched(model)) == 1
        assert len(patched(model)) == 1  # the outer block still holds it
    assert patched(model) == []
    with pytest.raises(ZeroDivisionError):
        with native_layers(model):
            1 / 0
    assert patched(model) == []


def test_a_forward_set_or_deleted_inside_the_block_is_the_users():
    # The exit deleted module.forward whatever it was: a forward the user set inside the block was dropped, and one
    # the user deleted raised KeyError there, leaving the modules after it swapped for good.
    model = nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(1), nn.MaxPool2d(2))
    x = torch.randn(1, 1, 8, 8)

    def own(t):
        return t + 1

    with native_layers(model, True):
        model[0].forward = own
        del model[1].forward
    assert model[0].forward is own and patched(model) == [model[0]]
    assert torch.equal(model[2](x), nn.MaxPool2d.forward(model[2], x)) and _patching._patched == {}


def test_a_forward_the_user_takes_from_another_swapped_module_inside_the_block_is_the_users():
    # (mutation testing of _patching: the exit deleting any installed forward, not only the module's own, survived)
    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(3))
    with native_layers(model, True):
        model[0].forward = own = model[1].forward  # pools as model[1] does: the user's choice, not the swap's
    assert model[0].__dict__["forward"] is own and patched(model) == [model[0]] and _patching._patched == {}


def test_leaves_user_forwards_subclasses_and_switch_alone(monkeypatch):
    class MyPool(nn.MaxPool2d):
        pass

    own = nn.MaxPool2d(2)
    own.forward = functools.partial(torch.clone)  # the user's own instance forward (a partial, like the swap's)
    model = nn.Sequential(own, MyPool(2))
    with native_layers(model):
        assert model[0].forward(torch.ones(1, 1, 2, 2)).shape == (1, 1, 2, 2)
        assert "forward" not in model[1].__dict__
    assert own.forward.func is torch.clone  # still the user's
    plain = TinyCNN()
    with native_layers(plain, enabled=False):
        assert patched(plain) == []
    compiled = nn.Module()  # as torch.compile's OptimizedModule holds the model, without importing dynamo (4 s)
    compiled._orig_mod = plain
    with native_layers(compiled):  # compiled models keep their graphs
        assert patched(plain) == []
    with native_layers(plain.forward):  # a plain callable: nothing to swap
        assert patched(plain) == []
    monkeypatch.setenv(ENV_SWITCH, "0")
    with native_layers(plain):
        assert patched(plain) == []
    monkeypatch.setenv(ENV_SWITCH, "maybe")  # the switches' shared parser: test_memory_pool.py
    with pytest.raises(ValueError, match=r"expected \$ROBUST_OPS_NATIVE_LAYERS to be one of"):
        with native_layers(plain):
            pass


def test_leaves_a_forward_delegating_to_another_module_alone():
    # a user's instance forward that is another pool's bound forward (same class, so it looks like a copy's) is
    # the user's: left alone, and the pool keeps running it
    other, pool = nn.MaxPool2d(1), nn.MaxPool2d(2)
    pool.forward = other.forward
    x = torch.randn(1, 1, 4, 4)
    with native_layers(nn.Sequential(pool)):
        assert torch.equal(pool(x), x)
    assert pool.forward.__self__ is other


def test_leaves_a_users_function_bound_to_the_pool_alone():
    # (mutation testing of _patching: taking any method bound to the module for the swap's own survived) a user's
    # forward made with types.MethodType is bound to the pool itself, but is not the class's forward
    pool, x = nn.MaxPool2d(2), torch.randn(1, 1, 4, 4)
    pool.forward = own = types.MethodType(lambda self, t: t + 1, pool)
    with native_layers(nn.Sequential(pool), True):
        assert torch.equal(pool(x), x + 1)
    assert pool.__dict__["forward"] == own


def test_attacks_inside_an_explicit_setting_follow_it_over_the_environment(monkeypatch):
    """An attack opens native_layers(model) itself (enabled None): inside native_layers(model, False) it runs
    without them although the variable is on (the default), inside an explicit True with the variable off it runs
    with them -- the shared rule of the switches (prepacked_conv's is tested in test_prepacked_conv.py)."""
    from robust_ops.attacks.context import attack_context

    model = TinyCNN()
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    with native_layers(model, enabled=False), attack_context(model):
        assert patched(model) == []
    with attack_context(model):
        assert patched(model) != []
    monkeypatch.setenv(ENV_SWITCH, "0")
    with native_layers(model, enabled=True), attack_context(model):
        assert patched(model) != []
    with attack_context(model):
        assert patched(model) == []


def test_attacks_identical_with_and_without_and_modules_restored(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    model.eval()
    x = torch.rand(8, 1, 24, 24)
    y = torch.randint(0, 2, (8,))
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    fast = attacks.pgd(model, x, y, **kwargs)
    assert patched(model) == [] and all(p.requires_grad for p in model.parameters())
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert torch.equal(attacks.pgd(model, x, y, **kwargs), fast)


eval_bn_backward = torch.ops.robust_ops._eval_batch_norm_backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_batch_norm_backward_op(dtype):
    c = 6
    bn = eval_bn(c, dtype)
    grad = torch.randn(3, c, 5, 7, dtype=dtype)
    ref = torch.ops.aten.native_batch_norm_backward(grad, grad, bn.weight, bn.running_mean, bn.running_var, None,
                                                    None, False, bn.eps, [True, False, False])[0]
    invstd = (bn.running_var + bn.eps).rsqrt()
    assert torch.equal(eval_bn_backward(grad, invstd, bn.weight), (grad * invstd.view(1, c, 1, 1)) * bn.weight.view(
        1, c, 1, 1))
    assert torch.allclose(eval_bn_backward(grad, invstd, bn.weight), ref)
    torch.library.opcheck(eval_bn_backward, (grad.requires_grad_(), invstd, bn.weight))
    torch.library.opcheck(eval_bn_backward, (grad[:, :, :, ::2], invstd, None))
    cl = grad.detach().contiguous(memory_format=torch.channels_last)
    got = eval_bn_backward(cl, invstd, bn.weight)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, eval_bn_backward(grad, invstd,
                                                                                                       bn.weight))
    assert torch.equal(eval_bn_backward(cl, invstd, None), eval_bn_backward(grad.detach(), invstd, None))
    torch.library.opcheck(eval_bn_backward, (cl.requires_grad_(), invstd, bn.weight))
    # Linear in grad_output: the op's own gradient is the op (with the weight too: mutation pass, 2026-12-01).
    for weight in (None, bn.weight.detach().double()):
        assert torch.autograd.gradcheck(lambda g: eval_bn_backward(g, invstd.double(), weight),
                                        (torch.randn(2, c, 3, 3, dtype=torch.float64, requires_grad=True),))
        # ...and that gradient is differentiable again (the double backward of a gradient penalty's gradient, e.g. a
        # Hessian-vector product): the op applied to a detached grad passed gradcheck but cut the graph there
        # (mutation pass, 2026-12-04).
        assert torch.autograd.gradgradcheck(lambda g: eval_bn_backward(g, invstd.double(), weight),
                                            (torch.randn(2, c, 3, 3, dtype=torch.float64, requires_grad=True),))


def test_eval_batch_norm_backward_strided_invstd_and_weight():
    """invstd and weight as strided views (a column of a (C, 2) tensor) are read by their strides, in both layouts
    (mutation testing: dropping their contiguous() survived)."""
    invstd, weight = torch.rand(3, 2)[:, 0], torch.randn(3, 2)[:, 1]
    assert not (invstd.is_contiguous() or weight.is_contiguous())
    for layout in (torch.contiguous_format, torch.channels_last):
        grad = torch.randn(2, 3, 4, 5).contiguous(memory_format=layout)
        expected = grad * invstd.view(1, 3, 1, 1)
        assert torch.equal(eval_bn_backward(grad, invstd, None), expected)
        assert torch.equal(eval_bn_backward(grad, invstd, weight), expected * weight.view(1, 3, 1, 1))


def test_eval_batch_norm_backward_errors():
    g = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"_eval_batch_norm_backward: expected invstd of shape \(3,\), got \(4,\)"):
        eval_bn_backward(g, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="_eval_batch_norm_backward: expected grad_output to be float32 or float64"):
        eval_bn_backward(g.half(), torch.ones(3).half(), None)
    with pytest.raises(RuntimeError, match=r"expected weight to have the dtype of grad_output \(torch.float32\), got "
                                           r"torch.float64"):
        eval_bn_backward(g, torch.ones(3), torch.ones(3, dtype=torch.float64))
    # the fake kernel (torch.compile) refuses what the C++ kernel refuses
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_g, fake_invstd = mode.from_tensor(g.double()), mode.from_tensor(torch.ones(3))
    with mode, pytest.raises(RuntimeError, match=r"expected invstd to have the dtype of grad_output "
                                                 r"\(torch.float64\), got torch.float32"):
        eval_bn_backward(fake_g, fake_invstd, None)
    with pytest.raises(RuntimeError, match="gradients with respect to invstd and weight are not implemented"):
        eval_bn_backward(g, torch.ones(3), torch.ones(3, requires_grad=True)).sum().backward()


@pytest.mark.parametrize(
    "grad, invstd, weight, message",
    [
        (torch.ones(2, 3, 4), torch.ones(4), None, "expected invstd of shape (3,), got (4,)"),
        (torch.ones(2, 3, 4, dtype=torch.float16), torch.ones(3, dtype=torch.float16), None,
         "expected grad_output to be float32 or float64, got torch.float16"),
        (torch.ones(2, 3, 4, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), None,
         "expected grad_output to be float32 or float64, got torch.bfloat16"),
        (torch.ones(2, 3, 4), torch.ones(3), torch.ones(4), "expected weight of shape (3,), got (4,)"),
        (torch.ones(2, 3, 4), torch.ones(3), torch.ones(1, 3), "expected weight of shape (3,), got (1, 3)"),
        (torch.ones(2, 3, 4), torch.ones(3), torch.ones(3).double(),
         "expected weight to have the dtype of grad_output (torch.float32), got torch.float64"),
        (torch.ones(3), torch.ones(3), None, "expected grad_output to be (N, C, ...), got 1-D"),
        # a (C, 1) invstd or weight holds C values but is not (C,)
        (torch.ones(2, 3, 4), torch.ones(3, 1), None, "expected invstd of shape (3,), got (3, 1)"),
        (torch.ones(2, 3, 4), torch.ones(3), torch.ones(3, 1), "expected weight of shape (3,), got (3, 1)"),
        (torch.ones(2, 3, 4), torch.ones(3).double(), None,
         "expected invstd to have the dtype of grad_output (torch.float32), got torch.float64"),
        # wrong dtype and shape: the dtype is checked first, by the C++ kernel as by the fake kernel
        (torch.ones(2, 3, 4), torch.ones(4).double(), None,
         "expected invstd to have the dtype of grad_output (torch.float32), got torch.float64"),
        (torch.ones(2, 3, 4), torch.ones(3), torch.ones(4).double(),
         "expected weight to have the dtype of grad_output (torch.float32), got torch.float64"),
    ],
)
def test_eval_batch_norm_backward_fake_kernel_refuses_what_the_kernel_refuses(grad, invstd, weight, message):
    """Each check, eager and fake (torch.compile), with the same text: the fake kernel's half-dtype and weight-shape
    checks were untested (mutation pass, 2026-12-01)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError) as native:
        eval_bn_backward(grad, invstd, weight)
    assert "_eval_batch_norm_backward: " + message in str(native.value)
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in (grad, invstd, weight)]
        with pytest.raises(RuntimeError) as faked:
            eval_bn_backward(*fake)
    assert str(native.value).splitlines()[0] in str(faked.value)


@pytest.mark.parametrize("missing", ["grad_output", "invstd"])
def test_eval_batch_norm_backward_refuses_none_for_a_required_tensor_eager_and_fake(missing):
    """The schema's Tensor arguments take None (an undefined tensor): the C++ kernel raised on it, while the fake
    kernel returned a gradient for a None invstd (torch.compile traced a call that fails when run) and failed with
    an AttributeError on a None grad_output. Both now raise a RuntimeError naming the argument."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = {"grad_output": torch.ones(2, 3, 4), "invstd": torch.ones(3), "weight": torch.ones(3)}
    args[missing] = None
    message = rf"^_eval_batch_norm_backward: expected {missing} to be a tensor, got None$"
    with pytest.raises(RuntimeError, match=message):
        eval_bn_backward(*args.values())
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in args.values()]
        with pytest.raises(RuntimeError, match=message):
            eval_bn_backward(*fake)
    with pytest.raises(RuntimeError, match=message):  # meta tensors reach the fake kernel too
        eval_bn_backward(*(None if t is None else t.to("meta") for t in args.values()))


@pytest.mark.parametrize("meta", ["invstd", "weight", "grad_output"])
def test_eval_batch_norm_backward_refuses_arguments_on_another_device(meta):
    """A meta invstd or weight with a CPU grad_output reached the fake kernel (Meta outranks CPU), which returned an
    uninitialized CPU tensor as the gradient; now the op's device check, as pgd_step_'s."""
    args = {"grad_output": torch.ones(2, 3, 4, 4), "invstd": torch.ones(3), "weight": torch.ones(3)}
    args[meta] = args[meta].to("meta")
    other = "invstd" if meta == "grad_output" else meta
    device = "meta" if meta == "grad_output" else "cpu"
    got = "cpu" if meta == "grad_output" else "meta"
    with pytest.raises(RuntimeError, match=rf"_eval_batch_norm_backward: expected {other} on the device of "
                                           rf"grad_output \({device}\), got {got}"):
        eval_bn_backward(*args.values())


def test_copies_taken_inside_use_their_own_statistics_and_pickle():
    import copy
    import pickle

    model = nn.Sequential(eval_bn(3), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with native_layers(model):
        twin = copy.deepcopy(model)
        pickle.loads(pickle.dumps(model))
    twin[0].running_var.mul_(4)  # the copy's own statistics must be the ones used
    twin[0].weight.mul_(-1)
    plain = copy.deepcopy(twin)
    for m in plain:
        m.__dict__.pop("forward", None)
    grad = torch.randn(2, 3, 3, 3)
    out, g = output_and_input_grad(twin, x, grad)
    ref_out, ref_grad = output_and_input_grad(plain, x, grad)
    assert torch.equal(out, ref_out) and torch.equal(g, ref_grad)
    with native_layers(twin):  # a later swap of the copy restores it like any model
        assert len(patched(twin)) == 2
    assert patched(twin) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_copies_and_pickles_taken_inside_hold_torchs_own_forward(tmp_path):
    """A copy, pickle or torch.save taken inside the block (an EMA snapshot in a custom defense inside fit) kept
    functools.partial(robust_ops._patching._dispatch, module) for good: torch.jit.script(copy) failed with
    "'functools.partial' object has no attribute '__globals__'", and the file did not load without robust_ops."""
    import copy
    import pickle

    import robust_ops

    model = nn.Sequential(eval_bn(3), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    with native_layers(model):
        copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
        torch.save((model, x, expected), tmp_path / "model.pt")
    for twin in copies:
        for m in twin:  # `m.forward` reads the class's forward bound to the copy: no instance attribute of the swap
            assert "forward" not in m.__dict__ and "__getstate__" not in m.__dict__
        assert torch.equal(twin(x), expected) and torch.equal(torch.jit.script(twin)(x), expected)
    code = ("import sys, torch\n"
            "sys.modules['robust_ops'] = None  # not importable\n"
            f"model, x, expected = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            "print(torch.equal(model(x), expected))\n")
    assert run_python(code).split() == ["True"]
    # the swap's bound forward is not taken for a user's own: replace_maxpool and a later swap handle the copy
    twin = copies[0]
    with native_layers(twin):
        assert len(patched(twin)) == 2
    robust_ops.replace_maxpool(copies[1])
    assert type(copies[1][1]) is robust_ops.DropMax2d


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_module_given_a_swapped_ones_dict_inside_scripts_after_its_own_swap():
    """A module whose __dict__ was copied from a swapped one inside the block (the swap's forward, __getstate__ and
    __prepare_scriptable__ come along, each naming the other module), then swapped itself, kept the other's
    __prepare_scriptable__ after every block: torch.jit.script of it refused for good, "torch.jit.script of MaxPool2d
    inside native_layers or prepacked_conv ... is not supported". The swap takes the copied one for its own, as it
    takes the copied __getstate__ (which no test reached either)."""
    pool = nn.MaxPool2d(2)
    x = torch.randn(1, 1, 4, 4)
    expected = pool(x)
    with native_layers(pool, True):
        twin = object.__new__(nn.MaxPool2d)
        twin.__dict__.update(pool.__dict__)
        with native_layers(twin, True):
            assert twin.__dict__["__getstate__"].args == (twin, None)  # the other's is not taken for the user's own
            assert twin.__dict__["__prepare_scriptable__"].args == (twin,)
            assert torch.equal(twin(x), expected) and patched(twin) == [twin]
    for m in (pool, twin):
        assert not {"forward", "__getstate__", "__prepare_scriptable__"} & set(m.__dict__)
        assert torch.equal(torch.jit.script(m)(x), expected)


def test_a_users_own_prepare_scriptable_stays_through_the_swap():
    """The swap installs its torch.jit.script refusal only where the module has no __prepare_scriptable__ of its own
    (a branch no test took): a user's own is kept inside the block, in copies taken there, and after it."""
    import copy

    pool = nn.MaxPool2d(2)
    pool.__prepare_scriptable__ = own = functools.partial(copy.copy, pool)
    with native_layers(pool, True):
        assert patched(pool) == [pool] and pool.__dict__["__prepare_scriptable__"] is own
        assert "__prepare_scriptable__" in copy.deepcopy(pool).__dict__
    assert patched(pool) == [] and pool.__dict__["__prepare_scriptable__"] is own


def test_a_copy_of_the_swapped_forward_held_elsewhere_is_the_class_forward_of_the_copy():
    """``module.forward`` read inside the block is the swap's partial; held beside the module (a dict of callbacks)
    and copied or pickled with it, it becomes the class's forward bound to the module's copy, as _InstalledForward
    says (its __reduce__, which no test ran): not a partial naming the original, nor one tied to robust_ops."""
    import copy
    import pickle

    pool = nn.MaxPool2d(2)
    x = torch.randn(1, 1, 4, 4)
    with native_layers(pool, True):
        held = {"model": pool, "forward": pool.forward}
        assert isinstance(held["forward"], functools.partial)
        copies = [copy.deepcopy(held), pickle.loads(pickle.dumps(held))]
    for twin in copies:
        forward = twin["forward"]
        assert forward.__self__ is twin["model"] and forward.__func__ is nn.MaxPool2d.forward
        assert "forward" not in twin["model"].__dict__ and torch.equal(forward(x), pool(x))


def test_shallow_copies_taken_inside_run_their_own_forward():
    """copy.copy of a swapped module kept the installed partial, which names the original: the copy ran the
    original's forward with the original's attributes (its own kernel_size ignored), during the block and after."""
    import copy

    model = nn.Sequential(eval_bn(3), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 8, 8)
    with native_layers(model):
        pool, bn = copy.copy(model[1]), copy.copy(model[0])
        pool.kernel_size = pool.stride = 4
        bn.eps = 0.5
        assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 4))
        assert torch.equal(bn(x), nn.BatchNorm2d.forward(bn, x))
        assert len(patched(model)) == 2 and model[1](x).shape == (2, 3, 4, 4)  # the original stays swapped
    assert pool(x).shape == (2, 3, 2, 2) and not {"forward", "__getstate__"} & (set(vars(pool)) | set(vars(bn)))
    assert patched(model) == [] and not {"forward", "__getstate__"} & set(vars(model[1]))


def test_copies_of_a_layer_with_its_own_getstate_run_their_own_forward():
    """A swapped layer that had an instance __getstate__ of its own got no __getstate__ from the swap (aec2515), so
    a copy.copy of it taken inside the block kept the installed partial naming the original: the copy ran the
    original's forward with the original's kernel_size. Now the swap's __getstate__ takes the state from the layer's
    own and leaves the swap out; the layer's own is back on the layer after the block, and on the copies."""
    import copy

    pool, x = nn.MaxPool2d(2), torch.randn(1, 1, 4, 4)

    def own():
        return dict(vars(pool))

    pool.__getstate__ = own
    with native_layers(nn.Sequential(pool), True):
        shallow, deep = copy.copy(pool), copy.deepcopy(pool)
        assert len(patched(nn.Sequential(pool))) == 1
    for c in (shallow, deep):
        c.kernel_size = c.stride = 1
        assert "forward" not in vars(c) and torch.equal(c(x), x)
    assert shallow.__dict__["__getstate__"] is own and pool.__dict__["__getstate__"] is own
    assert "forward" not in vars(pool) and _patching._patched == {}


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated
def test_models_captured_inside_the_block_get_atens_batch_norm():
    """The one-pass batch norm's autograd.Function (data pointers, statistics compared by value) failed
    torch.jit.trace ("unsupported argument type in the JIT tracer"), torch.export ("Cannot access data pointer of
    Tensor") and torch.compile(fullgraph=True) ("Data dependent operator") of a model inside the block."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), eval_bn(4), nn.MaxPool2d(2)).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    with native_layers(model):
        assert len(patched(model)) == 2
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,))
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x.clone().requires_grad_()), expected)
    assert "aten::batch_norm" in str(traced.inlined_graph) and torch.equal(traced(x), expected)
    assert torch.equal(exported.module()(x), expected)


@pytest.mark.parametrize("dynamo", [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")])
def test_onnx_export_inside_the_block_captures_atens_pooling(tmp_path, dynamo):
    """torch.onnx.export of a model inside native_layers (or an attack, or fit) failed on the swapped pools'
    robust_ops::max_pool2d after printing the whole graph: the export captures F.max_pool2d, bitwise the same."""
    from utils import check_onnx_export

    model = nn.Sequential(nn.Conv2d(1, 4, 3), eval_bn(4), nn.MaxPool2d(3, 2, 1)).eval()
    with native_layers(model):
        assert len(patched(model)) == 2
        check_onnx_export(model, torch.randn(2, 1, 11, 11), tmp_path, dynamo=dynamo)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripting_inside_the_block_names_the_fix():
    """torch.jit.script compiles getattr(module, "forward"), the swap's partial inside the block: it failed with
    "'_InstalledForward' object has no attribute '__globals__'", which named nothing to do."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), eval_bn(4), nn.MaxPool2d(2)).eval()
    x = torch.randn(2, 1, 8, 8)
    with native_layers(model):
        with pytest.raises(RuntimeError, match="^torch.jit.script of BatchNorm2d inside native_layers or "
                           "prepacked_conv .* script the model outside the with block$"):
            torch.jit.script(model)
        assert len(patched(model)) == 2  # the block goes on as before
    assert not any("__prepare_scriptable__" in vars(m) for m in model)
    assert torch.equal(torch.jit.script(model)(x), model(x))


def test_copies_taken_inside_run_the_plain_forward(monkeypatch):
    import copy

    from robust_ops import native_layers as nl

    calls = []
    real = nl.max_pool2d
    monkeypatch.setattr(nl, "max_pool2d", lambda *args: calls.append(1) or real(*args))
    model = nn.Sequential(eval_bn(3), nn.MaxPool2d(2))
    x = torch.randn(2, 3, 6, 6)
    with native_layers(model):
        twin = copy.deepcopy(model)
        twin(x)
        assert calls == []  # not registered: the copy's modules are not swapped
        model(x)
        assert calls == [1]
    twin(x)
    assert calls == [1]
    with native_layers(twin):
        twin(x)
    assert calls == [1, 1]


def test_in_place_weight_update_before_the_backward_is_refused_as_by_aten():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    for fast in (False, True):
        bn = eval_bn(3)
        with native_layers(bn, enabled=fast):
            out = bn(x)
            with torch.no_grad():
                bn.weight.mul_(2)
            match = "native_layers: the weight of BatchNorm2d.* was modified in place" if fast else "inplace operation"
            with pytest.raises(RuntimeError, match=match):
                out.sum().backward()
    bn = eval_bn(3, affine=False)  # no weight to check
    with native_layers(bn):
        bn(x).sum().backward()


def test_a_weight_replaced_between_forward_and_backward_gives_the_forward_weights_gradient():
    # as ATen's batch norm, which saved the weight it ran with: the backward reads the forward's weight, not the
    # module's new one (mutation testing of native_layers: reading bn.weight in the backward survived; it refused
    # the replaced weight as "modified in place")
    x, grad = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    grads = []
    for fast in (False, True):
        bn = eval_bn(3)
        with native_layers(bn, enabled=fast):
            leaf = x.clone().requires_grad_()
            out = bn(leaf)
            bn.weight = nn.Parameter(bn.weight.detach() * 3, requires_grad=False)
            out.backward(grad)
        grads.append(leaf.grad)
    assert torch.equal(grads[1], grads[0])


def test_backward_formats_no_module_repr_unless_the_weight_changed(monkeypatch):
    # the message naming the module was built on every backward of every batch norm: ~3 us each, each attack step
    reprs = []
    real = nn.BatchNorm2d.extra_repr
    monkeypatch.setattr(nn.BatchNorm2d, "extra_repr", lambda self: reprs.append(1) or real(self))
    bn = eval_bn(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with native_layers(bn):
        bn(x).sum().backward()
        assert reprs == []
        out = bn(x)
        with torch.no_grad():
            bn.weight.mul_(2)
        with pytest.raises(RuntimeError, match="native_layers: the weight of BatchNorm2d.* was modified in place"):
            out.sum().backward()
    assert reprs


@pytest.mark.parametrize("device, swapped", [("cpu", True), ("cuda", False)])
def test_library_speedups_swap_and_pool_for_cpu_work_only(monkeypatch, device, swapped):
    # (no GPU needed: the device only decides; the swapped modules would fall back on another device)
    for switch in (ENV_SWITCH, "ROBUST_OPS_CPU_POOL"):
        monkeypatch.delenv(switch, raising=False)
    model = TinyCNN()
    prepacked = swapped and torch.backends.mkldnn.is_available()
    with library_speedups(model, device, prepacked_conv=True):
        assert len(patched(model)) == swapped + 2 * prepacked  # the max pool; the two convolutions
        assert prepacked_conv_active(model) == prepacked
        assert (cpu_memory_pool_stats().depth > 0) == swapped
    assert patched(model) == []


def resnet_like():
    """A convolution, an eval-mode batch norm with running statistics, max pooling and a linear head on 1x16x16."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), eval_bn(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10)).eval()


def test_an_inner_explicit_false_switches_off_an_enclosing_swap():
    """``with native_layers(model, False):`` inside a block that had swapped the modules (fit, an attack, an explicit
    True) left the swap running; the innermost explicit setting now decides, and the outer one holds again after."""
    from robust_ops._patching import active_replacement

    model = resnet_like()
    pool = next(m for m in model.modules() if type(m) is nn.MaxPool2d)
    with native_layers(model, True):
        with attacks.attack_context(model):
            assert active_replacement(pool) is not None
            with native_layers(model, False):
                assert active_replacement(pool) is None
            assert active_replacement(pool) is not None
    assert patched(model) == []


def test_torch_func_grad_runs_through_eval_batch_norm():
    """torch.func.grad / vjp inside native_layers failed on the eval-mode batch norm's autograd.Function ("must
    override the setup_context staticmethod"): such inputs run ATen's batch norm, as max pooling already did."""
    model = resnet_like().eval()
    x = torch.rand(2, 1, 16, 16)
    with attacks.attack_context(model):
        with native_layers(model, False):
            ref = torch.func.grad(lambda v: model(v).sum())(x)
        assert torch.equal(torch.func.grad(lambda v: model(v).sum())(x), ref)
        (vjp,) = torch.func.vjp(model, x)[1](torch.ones(2, 10))
        assert torch.equal(vjp, ref)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's per-sample fallback for the native ops
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func imports it
def test_torch_func_transforms_around_vmap_run_the_modules_own_forward():
    """grad(vmap(f)) and jvp(vmap(f)) failed inside native_layers with torch's "must override the setup_context" and
    "Batching rule not implemented for aten::_unpack_dual": the check saw only the outermost (batched) wrapper."""
    from torch.func import grad, jvp, vmap

    model, pool = resnet_like(), nn.MaxPool2d(3, 2, 1)
    x = torch.rand(3, 1, 1, 16, 16)
    t = torch.randn_like(x)
    cases = {
        "grad(vmap(model))": lambda: grad(lambda v: vmap(model)(v).pow(2).sum())(x),
        "jvp(vmap(model))": lambda: jvp(vmap(model), (x,), (t,))[1],
        "grad(vmap(pool))": lambda: grad(lambda v: vmap(pool)(v).pow(2).sum())(x),
        "jvp(vmap(pool))": lambda: jvp(vmap(pool), (x,), (t,))[1],
        "vmap(grad(pool))": lambda: vmap(grad(lambda v: pool(v).pow(2).sum()))(x),
    }
    refs = {name: case() for name, case in cases.items()}
    with native_layers(model), native_layers(pool):
        assert len(patched(model)) == 2 and patched(pool) == [pool]
        for name, case in cases.items():
            assert torch.equal(case(), refs[name]), name


def test_attacks_on_a_model_elsewhere_than_the_cpu_swap_nothing(monkeypatch):
    """attack_context passed no device, so a CUDA model's attacks turned on the CPU pool and swapped forwards that
    only fell back. (No GPU needed: a meta model stands for any non-CPU device.)"""
    for switch in (ENV_SWITCH, "ROBUST_OPS_CPU_POOL"):
        monkeypatch.delenv(switch, raising=False)
    model = TinyCNN().to("meta")
    with attacks.attack_context(model):
        assert patched(model) == [] and cpu_memory_pool_stats().depth == 0
    # a model with buffers but no parameters: its device comes from the buffers
    buffers_only = nn.Sequential(nn.BatchNorm2d(1, affine=False), nn.MaxPool2d(2)).eval().to("meta")
    with attacks.attack_context(buffers_only):
        assert patched(buffers_only) == [] and cpu_memory_pool_stats().depth == 0
    cpu_model = TinyCNN()
    with attacks.attack_context(cpu_model):
        assert len(patched(cpu_model)) == 1 and cpu_memory_pool_stats().depth > 0


def test_library_speedups_and_library_pool_refuse_a_bad_device_by_name():
    # torch.device's own errors ("Invalid device string: 'cpu '", a list of overloads for None) named neither
    from robust_ops.memory import library_pool
    from robust_ops.native_layers import library_speedups

    with pytest.raises(ValueError, match="^library_speedups: expected device to be a torch.device or a string such as"):
        with library_speedups(torch.nn.Linear(2, 2), device="cpu "):
            pass
    with pytest.raises(ValueError, match="^library_pool: expected device to be a torch.device or a string such as"):
        library_pool(None)


def test_an_explicit_false_for_one_layer_leaves_the_others_swapped(monkeypatch):
    # Attacks (enabled None) took the first enclosing decision for ALL the model's layers: native_layers(bn, False)
    # switched off the max pooling as well. Each module now follows its own innermost explicit setting, else the
    # variable (the rule prepacked_conv shares, tested there with an explicit True).
    from robust_ops import _patching
    from robust_ops.attacks.context import attack_context
    from robust_ops.native_layers import _batch_norm_forward, _max_pool_forward

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)).eval()
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    with native_layers(model[1], False), attack_context(model):
        assert _patching.active_replacement(model[1]) is None
        assert _patching.active_replacement(model[2]) is _max_pool_forward
    monkeypatch.setenv(ENV_SWITCH, "0")
    with native_layers(model[1], True), attack_context(model):
        assert _patching.active_replacement(model[1]) is _batch_norm_forward
        assert _patching.active_replacement(model[2]) is None


def test_batch_norm_without_an_input_gradient_to_compute_runs_atens(monkeypatch):
    """The one-pass backward is for inputs that need a gradient: an input that needs none, or any input under
    no_grad (an attack's clean forward, IMA's search rounds), runs ATen's batch norm and reads no invstd (mutation
    testing of native_layers: dropping that condition survived, as outputs stay bitwise equal)."""
    import robust_ops.native_layers as nl

    reads = []
    real = nl._eval_bn_invstd
    monkeypatch.setattr(nl, "_eval_bn_invstd", lambda bn, dtype: reads.append(bn) or real(bn, dtype))
    bn, x = eval_bn(3), torch.randn(2, 3, 4, 4)
    expected = bn(x)
    with native_layers(bn):
        assert torch.equal(bn(x), expected)
        with torch.no_grad():
            assert torch.equal(bn(x.requires_grad_()), expected)
        assert reads == []
        bn(x)  # needs a gradient, outside no_grad: the one-pass path
    assert reads == [bn]
