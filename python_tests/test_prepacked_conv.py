"""robust_ops.prepacked_conv: convolutions on weights packed once per attack -- close to ATen's results, packs
reused only while the weights are frozen, off by default, fallbacks wherever it does not apply, and IMA's
compaction still bitwise equal to the masked form with it on."""

import itertools

import numpy
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from robust_ops import attacks
from robust_ops import _patching
from robust_ops import prepacked_conv as pc
from robust_ops.attacks.context import attack_context
from robust_ops.ima import _INVARIANT_SIZES, batch_invariant_sizes, gen_adv, gen_adv_masked, probe_rows

from utils import TinyCNN, check_onnx_export, expected_trace_warnings, run_python

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")

# Other oneDNN kernels than ATen's: sums in another order, so float32 agrees to rounding, not bitwise.
CLOSE = dict(rtol=2e-5, atol=2e-5)


def output_and_input_grad(model, x, grad=None):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out) if grad is None else grad)
    return out.detach(), g


def frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# (in, out, kernel, stride, padding, dilation, groups, bias, input gradient from the packed transposed kernel?)
CONFIGS = [
    (3, 8, 3, 1, 1, 1, 1, True, True),
    (3, 8, 3, 1, 0, 1, 1, False, True),
    (4, 6, 5, 1, 2, 1, 1, True, True),
    (4, 6, 3, 1, 2, 2, 1, True, True),  # dilated
    (4, 8, 1, 1, 0, 1, 1, False, True),
    (4, 8, 3, 2, 1, 1, 1, True, False),  # strided: ATen's convolution_backward
    (4, 8, 1, 2, 0, 1, 1, False, False),
    (4, 8, 3, 1, 1, 1, 2, True, False),  # grouped
    (4, 8, (3, 1), (1, 2), (1, 0), 1, 1, True, False),
    (2, 4, 3, 1, 3, 1, 1, True, False),  # padding beyond the kernel's reach
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_input_gradient_match_aten(config, layout, batch):
    cin, cout, k, stride, padding, dilation, groups, bias, packed_backward = config
    torch.manual_seed(batch)
    conv = frozen(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias))
    assert (pc._input_gradient_padding(conv) is not None) == packed_backward
    if layout is torch.channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, 11, 9).contiguous(memory_format=layout)
    out_shape = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, groups).shape
    grad = torch.randn(out_shape).contiguous(memory_format=layout)
    ref_out, ref_grad = output_and_input_grad(conv, x, grad)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        out, g = output_and_input_grad(conv, x, grad)
        assert type(conv(x.requires_grad_()).grad_fn).__name__ == "_PrepackedConv2dBackward"
    torch.testing.assert_close(out, ref_out, **CLOSE)
    torch.testing.assert_close(g, ref_grad, **CLOSE)
    assert g.shape == x.shape


@pytest.mark.parametrize("stride", [1, 2], ids=["packed-input-gradient", "atens-input-gradient"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_outputs_and_input_gradients_come_in_atens_memory_format(stride, in_channels):
    # oneDNN's inference primitive writes channels_last whatever the input: an NCHW model's .view(n, -1) after a
    # convolution failed inside attacks. ATen: channels_last when the input's or the weight's strides suggest it --
    # for a 1-channel input (contiguous in both layouts) its strides decide, so strides are compared, not layouts.
    torch.manual_seed(0)
    formats = (torch.contiguous_format, torch.channels_last)
    for input_format, weight_format, grad_format in itertools.product(formats, repeat=3):
        conv = frozen(nn.Conv2d(in_channels, 8, 3, stride, padding=1)).to(memory_format=weight_format)
        x = torch.randn(2, in_channels, 6, 6).contiguous(memory_format=input_format)
        grad = torch.randn(conv(x).shape).contiguous(memory_format=grad_format)
        ref_out, ref_grad = output_and_input_grad(conv, x, grad)
        with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
            out, g = output_and_input_grad(conv, x, grad)
        case = (input_format, weight_format, grad_format)
        assert out.stride() == ref_out.stride(), case
        assert g.stride() == ref_grad.stride(), case
        torch.testing.assert_close(g, ref_grad, **CLOSE)


def test_a_batch_of_one_hwc_image_keeps_atens_layout_and_a_view_after_the_convolution_runs():
    """A batch of one HWC image (permute(2, 0, 1).unsqueeze(0): channels_last-contiguous, yet NCHW to ATen, whose rule
    also reads the batch dimension's stride) came out of a packed convolution channels_last, where ATen's is NCHW: a
    model's .view(n, -1) after it failed inside attacks ("view size is not compatible with input tensor's size and
    stride"). The layout is ATen's over random strides of size-1 dimensions too (1-channel inputs, 1 x 1 images and
    kernels, a batch of one, either layout of input and weight)."""
    torch.manual_seed(0)
    conv = frozen(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.rand(5, 6, 3).permute(2, 0, 1).unsqueeze(0)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        out = conv(x)
        out.view(1, -1)  # an NCHW model's flattening
    assert out.stride() == conv(x).stride() == (120, 30, 6, 1)
    gen = torch.Generator().manual_seed(0)

    def pick(choices):
        return choices[int(torch.randint(len(choices), (), generator=gen))]

    def restrided(shape, memory_format):
        t = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)
        strides = [pick((s, 1, 2, 7, 40)) if n == 1 else s for n, s in zip(shape, t.stride())]
        return t.as_strided(shape, strides)

    formats = (torch.contiguous_format, torch.channels_last)
    for _ in range(40):
        cin, cout, k = pick((1, 2, 3)), pick((1, 2, 3)), pick((1, 1, 2))
        shape = (pick((1, 1, 2)), cin, pick((1, 2, 3)) + k - 1, pick((1, 2, 3)) + k - 1)
        conv = frozen(nn.Conv2d(cin, cout, k, bias=False))
        conv.weight = nn.Parameter(restrided(conv.weight.shape, pick(formats)), requires_grad=False)
        x = restrided(shape, pick(formats))
        grad = torch.randn(conv(x).shape, generator=gen)
        ref_out, ref_grad = output_and_input_grad(conv, x, grad)
        with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
            out, g = output_and_input_grad(conv, x, grad)
        case = (x.shape, x.stride(), conv.weight.stride())
        assert out.stride() == ref_out.stride(), case
        assert g.stride() == ref_grad.stride(), case


def test_an_in_place_op_after_a_packed_convolution_runs():
    # the strides are fixed by a copy, not an as_strided view: a custom Function's view output refuses in-place ops
    torch.manual_seed(0)
    model = frozen(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(inplace=True)))  # 1-channel NCHW output: restrided
    x = torch.randn(2, 1, 5, 5)
    ref = output_and_input_grad(model, x)
    with pc.prepacked_conv(model, True), pc.weight_pack_scope():
        got = output_and_input_grad(model, x)
    torch.testing.assert_close(got, ref, **CLOSE)


def test_resnet18_outputs_and_gradients_close_in_both_layouts():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(4, 3, 32, 32)
    with attack_context(model):
        ref = output_and_input_grad(model, x)
    for layout in (torch.contiguous_format, torch.channels_last):
        net = model.to(memory_format=layout)
        with pc.prepacked_conv(net, True), attack_context(net):
            got = output_and_input_grad(net, x.contiguous(memory_format=layout))
            again = output_and_input_grad(net, x.contiguous(memory_format=layout))
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic, packs reused


def count_packs(monkeypatch):
    calls = []
    real = pc._pack

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(pc, "_pack", counting)
    return calls


def test_packs_once_per_attack_and_after_weight_changes(monkeypatch):
    calls = count_packs(monkeypatch)
    model = TinyCNN(1, 3).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    x = torch.rand(3, 1, 8, 8)
    with pc.prepacked_conv(model, True):
        with attack_context(model):
            for _ in range(4):
                output_and_input_grad(model, x)
            # one forward pack and one input-gradient pack per (stride-1) convolution, however many calls
            assert len(calls) == 2 * len(convs)
            with torch.no_grad():
                convs[0].weight.mul_(2)  # an in-place update bumps the version: repacked
            changed = output_and_input_grad(model, x)
            assert len(calls) == 2 * len(convs) + 2
        with attack_context(model):  # a new attack starts with fresh packs
            output_and_input_grad(model, x)
            assert len(calls) == 4 * len(convs) + 2
    with attack_context(model):
        ref = output_and_input_grad(model, x)  # ATen's, with the doubled weight
    torch.testing.assert_close(changed[0], ref[0], **CLOSE)
    torch.testing.assert_close(changed[1], ref[1], **CLOSE)


@pytest.mark.parametrize("optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True), lambda ps: torch.optim.Adam(ps, lr=0.5, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.5, foreach=False),
], ids=["sgd-fused", "adam-fused", "sgd"])
def test_an_optimizer_step_inside_a_pack_scope_repacks(optimizer):
    # The fused optimizers update parameters in place without bumping their version counters: the packs, keyed on
    # the version, kept serving the weights of before the step (outputs off by ~40 here). Any optimizer step repacks.
    conv = frozen(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(4, 3, 10, 10)
    step = optimizer(list(conv.parameters()))
    for p in conv.parameters():
        p.grad = torch.ones_like(p)  # the parameters are frozen, as inside an attack; their .grad is kept
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        output_and_input_grad(conv, x)
        step.step()
        got = output_and_input_grad(conv, x)
    expected = output_and_input_grad(lambda t: F.conv2d(t, conv.weight, conv.bias, padding=1), x)
    torch.testing.assert_close(got[0], expected[0], **CLOSE)
    torch.testing.assert_close(got[1], expected[1], **CLOSE)


def test_single_row_and_larger_batches_keep_their_own_packs(monkeypatch):
    # oneDNN lays out a one-row pack differently: sharing one would reorder the weight at every call of the other
    # kind (the IMA padding probe alternates 1 row and more).
    calls = count_packs(monkeypatch)
    model = TinyCNN(1, 3).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    one, three = torch.rand(1, 1, 8, 8), torch.rand(3, 1, 8, 8)
    with pc.prepacked_conv(model, True), attack_context(model):
        for _ in range(3):
            got_one = output_and_input_grad(model, one)
            got_three = output_and_input_grad(model, three)
        assert len(calls) == 4 * len(convs)  # forward + input-gradient packs, for each kind, once
    with attack_context(model):
        for got, x in ((got_one, one), (got_three, three)):
            ref = output_and_input_grad(model, x)
            torch.testing.assert_close(got[0], ref[0], **CLOSE)
            torch.testing.assert_close(got[1], ref[1], **CLOSE)


def double_in_place(weight):
    with torch.no_grad():
        weight.mul_(2)


def double_by_data_swap(weight):
    weight.data = weight.data * 2  # new storage, same version counter


@pytest.mark.parametrize("update", [double_in_place, double_by_data_swap], ids=lambda f: f.__name__)
def test_backward_after_an_in_place_weight_update_is_refused(update):
    conv = frozen(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        out = conv(x)
        update(conv.weight)
        with pytest.raises(RuntimeError, match="prepacked_conv: the weight of Conv2d.* was modified in place"):
            out.sum().backward()


def test_backward_formats_no_module_repr_unless_the_weight_changed(monkeypatch):
    # the message naming the convolution was built on every backward: ~4 us per layer, each attack step
    reprs = []
    real = nn.Conv2d.extra_repr
    monkeypatch.setattr(nn.Conv2d, "extra_repr", lambda self: reprs.append(1) or real(self))
    conv = frozen(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        conv(x).sum().backward()
        assert reprs == []
        out = conv(x)
        double_in_place(conv.weight)
        with pytest.raises(RuntimeError, match="prepacked_conv: the weight of Conv2d.* was modified in place"):
            out.sum().backward()
    assert reprs


def test_falls_back_outside_attacks_and_where_it_does_not_apply(monkeypatch):
    calls = count_packs(monkeypatch)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    with pc.prepacked_conv(conv, True):
        assert pc.prepacked_conv_active(conv)
        # Training: weights need gradients, and no attack scope -- ATen's convolution, bitwise.
        out = conv(x)
        assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, padding=1))
        out.sum().backward()
        assert conv.weight.grad is not None
        frozen(conv)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))  # no attack scope
        with pc.weight_pack_scope():
            unbatched = x[0, :, :3].contiguous()  # height = in_channels: read as a batch, the channels match
            for odd in (x.double(), x.transpose(2, 3), x[:0], x.to(torch.bfloat16), unbatched):
                conv.to(odd.dtype)  # float64 / bfloat16 weights for those inputs (in place)
                assert torch.equal(conv(odd), F.conv2d(odd, conv.weight, conv.bias, padding=1))
                conv.float()
            for trained in (conv.weight, conv.bias):  # a parameter that needs a gradient: ATen's, which gives it
                trained.requires_grad_(True)
                out = conv(x)
                assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, padding=1))
                out.sum().backward()
                assert trained.grad is not None
                trained.requires_grad_(False)
            same = nn.Conv2d(3, 4, 3, padding="same")
            frozen(same)
            with pc.prepacked_conv(same, True):
                assert torch.equal(same(x), F.conv2d(x, same.weight, same.bias, padding="same"))
            meta = frozen(nn.Conv2d(3, 4, 3)).to("meta")  # any device but the CPU; meta needs no GPU
            with pc.prepacked_conv(meta, True):
                assert meta(x.to("meta")).shape == (2, 4, 4, 4)
            circular = frozen(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
            with pc.prepacked_conv(circular, True):
                assert torch.equal(circular(x), circular._conv_forward(x, circular.weight, circular.bias))
    assert calls == []
    assert not pc.prepacked_conv_active(conv)


def error_of(fn):
    try:
        fn()
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


# (module arguments, input shape) ATen refuses; oneDNN's own errors said "could not create a primitive descriptor"
REFUSED = [
    ((3, 8, 3, 1, 1), (2, 4, 8, 8)),  # channels
    ((3, 8, 3, 1, 1), (2, 0, 8, 8)),
    ((4, 8, 3, 1, 1, 1, 2), (2, 2, 8, 8)),  # grouped: in_channels is the total
    ((3, 8, 3), (2, 3, 1, 1)),  # the kernel is larger than the padded input
    ((3, 8, 3, 1, 0, 2), (2, 3, 4, 4)),  # ... than its dilated extent
    ((3, 8, 1, 1, 1), (2, 3, 0, 4)),  # empty height: oneDNN computed an output
    ((3, 8, 3, -1), (2, 3, 8, 8)),
    ((3, 8, 3, 1, -1), (2, 3, 8, 8)),
    ((3, 8, 3, 1, 1, 0), (2, 3, 8, 8)),
    # ATen words a negative dilation otherwise than 0, which the pack refuses as ATen does (mutation testing of
    # prepacked_conv: dropping the dilation check survived)
    ((3, 8, 3, 1, 1, -1), (2, 3, 8, 8)),
    ((3, 8, 3), (2, 3, 1, 8)),  # only the height, or only the width, is too small
    ((3, 8, 3), (2, 3, 8, 1)),
    ((3, 8, 1, 1, 1), (2, 3, 4, 0)),  # empty width
    ((3, 8, 3, (1, -1)), (2, 3, 8, 8)),  # the second of stride, padding and dilation
    ((3, 8, 3, 1, (1, -1)), (2, 3, 8, 8)),
    ((3, 8, 3, 1, 1, (1, 0)), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("args, shape", REFUSED, ids=str)
def test_inputs_aten_refuses_raise_atens_message(args, shape):
    conv = frozen(nn.Conv2d(*args))
    x = torch.randn(*shape)
    expected = error_of(lambda: conv(x))
    assert expected is not None
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        error_of(lambda: conv(torch.randn(*shape[:1], conv.in_channels, 9, 9)))  # a pack for a valid input first
        assert error_of(lambda: conv(x)) == expected


def gray_first_layer(conv):
    conv.weight = nn.Parameter(conv.weight.sum(1, keepdim=True), requires_grad=False)  # in_channels stays 3


def smaller_kernel(conv):
    conv.weight = nn.Parameter(conv.weight[:, :, :3, :3].clone(), requires_grad=False)  # kernel_size stays (5, 5)


@pytest.mark.parametrize("surgery, channels", [(gray_first_layer, 1), (smaller_kernel, 3)],
                         ids=["gray_first_layer", "smaller_kernel"])
def test_a_weight_replaced_by_one_of_another_shape_is_packed_as_aten_reads_it(monkeypatch, surgery, channels):
    # ATen convolves with the weight's channels and kernel, whatever in_channels and kernel_size say; the packs read
    # the attributes: a 1-channel first layer made from an RGB one was never packed, and a 3x3 weight in a module
    # still saying 5x5 gave an input gradient of the wrong shape ("returned an invalid gradient ... got [2, 3, 14,
    # 14]").
    calls = count_packs(monkeypatch)
    conv = frozen(nn.Conv2d(3, 8, 5, padding=1))
    surgery(conv)
    x = torch.randn(2, channels, 10, 10)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        got = output_and_input_grad(conv, x)
        assert len(calls) == 2  # forward and input-gradient packs
        wrong = torch.randn(2, 4 - channels, 10, 10)  # the channels ATen refuses: its message, not oneDNN's
        assert error_of(lambda: conv(wrong)) == error_of(lambda: nn.Conv2d.forward(conv, wrong))
    expected = output_and_input_grad(lambda t: nn.Conv2d.forward(conv, t), x)
    torch.testing.assert_close(got[0], expected[0], **CLOSE)
    torch.testing.assert_close(got[1], expected[1], **CLOSE)


def test_a_weight_that_is_not_4_d_raises_atens_message():
    # (mutation testing of prepacked_conv: dropping the weight's dimension check survived; the kernel size read
    # then failed with a ValueError of its own)
    conv, x = frozen(nn.Conv2d(3, 8, 3)), torch.randn(2, 3, 8, 8)
    conv.weight = nn.Parameter(conv.weight[..., 0], requires_grad=False)
    expected = error_of(lambda: conv(x))
    assert expected is not None
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        assert error_of(lambda: conv(x)) == expected


@pytest.mark.parametrize("groups, out_channels", [(0, 8), (2, 7)], ids=["groups-0", "not-divisible"])
def test_groups_aten_refuses_raise_atens_message(groups, out_channels):
    # oneDNN said "could not create a primitive descriptor" for groups 0, and for a weight whose rows the groups do
    # not divide it packed a truncated weight and then failed on the bias
    conv = frozen(nn.Conv2d(4, 8, 3, groups=2))
    conv.groups = groups
    conv.weight = nn.Parameter(torch.randn(out_channels, 2, 3, 3), requires_grad=False)
    conv.bias = nn.Parameter(torch.randn(out_channels), requires_grad=False)
    x = torch.randn(2, 4, 8, 8)
    expected = error_of(lambda: conv(x))
    assert expected is not None
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        assert error_of(lambda: conv(x)) == expected


def test_mixed_dtypes_raise_atens_message():
    x = torch.randn(2, 3, 8, 8)
    for name in ("weight", "bias"):
        conv = frozen(nn.Conv2d(3, 8, 3))
        getattr(conv, name).data = getattr(conv, name).data.double()
        expected = error_of(lambda: conv(x))
        assert expected is not None
        with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
            assert error_of(lambda: conv(x)) == expected, name
    # an input in another dtype than the float32 weights: oneDNN computed bfloat16 and half, and refused float64
    # with its own message
    conv = frozen(nn.Conv2d(3, 8, 3))
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        expected = error_of(lambda: conv(x.to(dtype)))
        assert expected is not None
        with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
            assert error_of(lambda: conv(x.to(dtype))) == expected, dtype


def test_smallest_valid_input_is_packed(monkeypatch):
    calls = count_packs(monkeypatch)
    conv = frozen(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(2, 3, 1, 1)  # padded to exactly the kernel's size
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        out = conv(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias, padding=1), **CLOSE)


def test_pack_scopes_nest_empty_and_close_on_errors(monkeypatch):
    calls = count_packs(monkeypatch)
    conv = frozen(nn.Conv2d(3, 8, 3))
    x = torch.randn(2, 3, 6, 6)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        conv(x)
        with pc.weight_pack_scope():
            conv(x)
            assert len(calls) == 2  # a nested scope starts empty
        with pytest.raises(ZeroDivisionError), pc.weight_pack_scope():
            1 / 0
        conv(x)
        assert len(calls) == 2  # the outer scope's pack again: the failed inner scope was closed
    with pytest.raises(ZeroDivisionError), pc.weight_pack_scope():
        1 / 0
    assert pc._current_packs() is None


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags
def test_onednn_switched_off_runs_atens_convolution(monkeypatch):
    calls = count_packs(monkeypatch)
    conv = frozen(nn.Conv2d(3, 8, 3))
    x = torch.randn(2, 3, 6, 6)
    with torch.backends.mkldnn.flags(enabled=False), pc.prepacked_conv(conv, True):
        assert not pc.prepacked_conv_active(conv)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope(), torch.backends.mkldnn.flags(enabled=False):
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias))
    assert calls == []


def test_stride_zero_raises_atens_message_instead_of_killing_the_process():
    code = ("import torch; from torch import nn; from robust_ops import prepacked_conv as pc\n"
            "conv = nn.Conv2d(3, 8, 3, 0).requires_grad_(False)\n"
            "with pc.prepacked_conv(conv, True), pc.weight_pack_scope():\n"
            "    try: conv(torch.randn(2, 3, 8, 8))\n"
            "    except RuntimeError as err: print(err)\n")
    assert "non-positive stride is not supported" in run_python(code)


def test_copy_taken_inside_runs_atens_convolutions():
    import copy
    import pickle

    torch.manual_seed(0)
    model = frozen(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)))
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    with pc.prepacked_conv(model, True):
        twin = copy.deepcopy(model)
        pickled = pickle.loads(pickle.dumps(model))
        assert pc.prepacked_conv_active(model) and not pc.prepacked_conv_active(twin)
        with pc.weight_pack_scope():
            assert torch.equal(twin(x), expected)
    assert not pc.prepacked_conv_active(twin) and not pc.prepacked_conv_active(pickled)
    with pc.weight_pack_scope():
        assert torch.equal(twin(x), expected) and torch.equal(pickled(x), expected)
    with pc.prepacked_conv(twin, True):  # the copy can be switched on and off again like any model
        assert pc.prepacked_conv_active(twin)
    assert all("forward" not in m.__dict__ for m in twin.modules())


# (in, out, kernel, stride, padding, dilation, groups)
@pytest.mark.parametrize("args", [
    (2, 3, 3, 1, 2, 3, 1),  # distinct padding and dilation
    (4, 6, 3, 2, 1, 1, 2),  # strided and grouped: its stride and groups reach ATen's input gradient too
], ids=str)
def test_double_backward_matches_atens(args):
    # create_graph=True (gradient penalties): the input gradient is then ATen's differentiable one.
    torch.manual_seed(0)
    conv = frozen(nn.Conv2d(*args))
    x = torch.randn(2, conv.in_channels, 5, 5)

    def second_order():
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(conv(leaf).square().sum(), leaf, create_graph=True)
        return torch.autograd.grad(g.square().sum(), leaf)[0]

    expected = second_order()
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        got = second_order()
    torch.testing.assert_close(got, expected, **CLOSE)


def test_off_by_default_and_switched_by_the_environment(monkeypatch):
    model = TinyCNN(1, 3).eval()
    monkeypatch.delenv(pc.ENV_SWITCH, raising=False)
    with attack_context(model):
        assert not pc.prepacked_conv_active(model)
    monkeypatch.setenv(pc.ENV_SWITCH, "1")
    with attack_context(model):
        assert pc.prepacked_conv_active(model)
    assert not pc.prepacked_conv_active(model)
    monkeypatch.setenv(pc.ENV_SWITCH, "yes")  # the switches' shared parser: test_memory_pool.py
    with attack_context(model):
        assert pc.prepacked_conv_active(model)
    monkeypatch.setenv(pc.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match=r"expected \$ROBUST_OPS_PREPACKED_CONV to be one of"):
        with attack_context(model):
            pass


def test_attacks_follow_an_enclosing_explicit_setting_over_the_environment(monkeypatch):
    """Each attack opens its own prepacked_conv(model) (enabled None); inside an explicit prepacked_conv(model, False)
    -- fit(prepacked_conv=False) -- it stays off under $ROBUST_OPS_PREPACKED_CONV=1, inside an explicit True it stays
    on without it; the innermost explicit setting wins, and the decisions close with their contexts (errors too)."""
    model = TinyCNN(1, 3).eval()
    monkeypatch.setenv(pc.ENV_SWITCH, "1")
    with pc.prepacked_conv(model, False):
        with attack_context(model):
            assert not pc.prepacked_conv_active(model)
        with pc.prepacked_conv(model, True), attack_context(model):
            assert pc.prepacked_conv_active(model)
        with attack_context(model):
            assert not pc.prepacked_conv_active(model)
    with attack_context(model):
        assert pc.prepacked_conv_active(model)  # the variable again
    monkeypatch.delenv(pc.ENV_SWITCH)
    with pytest.raises(KeyError):
        with pc.prepacked_conv(model, True):
            with attack_context(model):
                assert pc.prepacked_conv_active(model)
            raise KeyError("inside")
    with attack_context(model):
        assert not pc.prepacked_conv_active(model)
    assert not _patching._decisions


def test_fit_with_prepacked_conv_false_packs_nothing_under_the_environment(monkeypatch):
    from robust_ops import defenses
    from robust_ops.train import fit

    calls = count_packs(monkeypatch)
    monkeypatch.setenv(pc.ENV_SWITCH, "1")
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    result = fit(TinyCNN(1, 3), defenses.build("at", steps=2), data, epochs=1, batch_size=4, prepacked_conv=False,
                 progress=False)
    assert not calls and result is not None
    fit(TinyCNN(1, 3), defenses.build("at", steps=2), data, epochs=1, batch_size=4, progress=False)
    assert calls  # None follows the variable


def test_pgd_close_to_atens_and_model_restored():
    torch.manual_seed(0)
    model = TinyCNN(1, 3).eval()
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 3, (6,))
    ref = attacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    with pc.prepacked_conv(model, True):
        got = attacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    # sign steps: a gradient entry within rounding of zero may step the other way
    assert (got - ref).abs().gt(1e-6).float().mean() < 0.01
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_ima_compacted_equals_masked_bitwise_with_prepacked_convolutions():
    g = torch.Generator().manual_seed(1)
    model = TinyCNN(1, 3).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    x = torch.rand(12, 1, 10, 10, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    margin = torch.rand(12, generator=g) * 4
    max_rows, reference_rows = probe_rows(x.shape[0])  # as gen_adv probes: the same cache entry
    with pc.prepacked_conv(model, True):
        a, ca = gen_adv(model, x, y, margin, steps=8, search_steps=6)
        b, cb = gen_adv_masked(model, x, y, margin, steps=8, search_steps=6)
        with attack_context(model):
            sizes_on = batch_invariant_sizes(model, x, max_rows=max_rows, reference_rows=reference_rows)
    assert ca.tolist() == cb.tolist() and bool(ca.any())
    assert torch.equal(a, b)
    # The padding sizes are measured per convolution mode: switching it re-probes instead of reusing.
    with attack_context(model):
        sizes_off = batch_invariant_sizes(model, x, max_rows=max_rows, reference_rows=reference_rows)
    keys = list(_INVARIANT_SIZES[model])
    assert len(keys) == 2 and sizes_on and sizes_off


@pytest.mark.parametrize("enabled", [True, False])
def test_nests_and_restores_with_native_layers(enabled):
    model = TinyCNN(1, 3)
    with pc.prepacked_conv(model, enabled), attack_context(model), pc.prepacked_conv(model, True):
        assert pc.prepacked_conv_active(model)
    assert not pc.prepacked_conv_active(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_an_inner_explicit_false_switches_off_an_enclosing_true():
    """A nested prepacked_conv(model, False) inside an explicit True left the outer swap running (and
    prepacked_conv_active said True): the innermost explicit setting now decides, inside attacks too."""
    model = TinyCNN(1, 3).eval()
    x = torch.rand(3, 1, 8, 8)
    with pc.prepacked_conv(model, True):
        with attack_context(model):
            assert pc.prepacked_conv_active(model)
            with pc.prepacked_conv(model, False):
                assert not pc.prepacked_conv_active(model)
                off = output_and_input_grad(model, x)
            assert pc.prepacked_conv_active(model)
    with attack_context(model):
        aten = output_and_input_grad(model, x)
    assert torch.equal(off[0], aten[0]) and torch.equal(off[1], aten[1])  # ATen's own bits


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # forward AD's first use imports it
def test_torch_func_transforms_and_autocast_run_atens_convolution(monkeypatch):
    """torch.func.grad / jvp failed inside a pack scope (the autograd.Function has no setup_context or jvp), and
    under CPU autocast the packed convolution returned float32 where ATen returns bfloat16."""
    calls = count_packs(monkeypatch)
    model = TinyCNN(1, 3).eval()
    x, t = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    with attack_context(model):
        grad_ref = torch.func.grad(lambda v: model(v).sum())(x)
        jvp_ref = torch.func.jvp(model, (x,), (t,))[1]
        with torch.autocast("cpu", torch.bfloat16):
            autocast_ref = model(x)
    with pc.prepacked_conv(model, True), attack_context(model):
        assert pc.prepacked_conv_active(model)
        grad = torch.func.grad(lambda v: model(v).sum())(x)
        jvp = torch.func.jvp(model, (x,), (t,))[1]
        with torch.autocast("cpu", torch.bfloat16):
            autocast_out = model(x)
    assert not calls  # nothing was packed: ATen ran every convolution
    assert torch.equal(grad, grad_ref) and torch.equal(jvp, jvp_ref)
    assert autocast_out.dtype == autocast_ref.dtype == torch.bfloat16 and torch.equal(autocast_out, autocast_ref)


def replaced_weight_test_conv():
    return frozen(nn.Conv2d(64, 64, 3, padding=1)), torch.randn(2, 64, 8, 8) / 24  # outputs of about 1 (CLOSE)


def replace_weight(conv):
    """Put a new weight in place of the conv's, freed first: the allocator often hands the new one its address."""
    del conv.weight
    conv.weight = nn.Parameter(torch.randn(64, 64, 3, 3), requires_grad=False)


def aten_output_and_input_grad(conv, weight, x):
    return output_and_input_grad(lambda t: F.conv2d(t, weight, conv.bias, padding=1), x)


def test_a_new_weight_at_a_freed_weights_address_is_packed_anew():
    # Packs were found by the weight's address and version alone: a new weight tensor at a freed weight's address
    # ran on the freed weight's pack (outputs off by ~5 here). The allocator often hands out that address (glibc
    # did at every try in a loop); a numpy buffer makes it certain. A pack now belongs to one weight tensor.
    conv, x = replaced_weight_test_conv()
    memory = numpy.empty((64, 64, 3, 3), dtype=numpy.float32)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        for seed in range(3):
            del conv.weight  # the weight packed last is freed ...
            memory[...] = torch.randn(memory.shape, generator=torch.Generator().manual_seed(seed)).numpy()
            conv.weight = nn.Parameter(torch.from_numpy(memory), requires_grad=False)  # ... a new one at its address
            got, expected = output_and_input_grad(conv, x), aten_output_and_input_grad(conv, conv.weight, x)
            torch.testing.assert_close(got[0], expected[0], **CLOSE)
            torch.testing.assert_close(got[1], expected[1], **CLOSE)


def test_a_weight_replaced_between_forward_and_backward_gives_the_forward_weights_gradient():
    # As ATen's convolution, which saves its weight: the backward read the module's weight at backward time, so a new
    # weight at the freed one's address gave that weight's gradient silently (and one elsewhere a misleading
    # "modified in place" error).
    conv, x = replaced_weight_test_conv()
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        for _ in range(10):
            x_grad = x.detach().clone().requires_grad_()
            out = conv(x_grad)
            expected = aten_output_and_input_grad(conv, conv.weight.clone(), x)[1]
            replace_weight(conv)
            (got,) = torch.autograd.grad(out, x_grad, torch.ones_like(out))
            torch.testing.assert_close(got, expected, **CLOSE)


def test_weights_swapped_inside_a_pack_scope_swap_and_are_packed_anew(monkeypatch):
    # A pack held a weakref to its weight, and torch.utils.swap_tensors refuses a tensor that has one: Module.to and
    # load_state_dict under torch's swap-on-conversion setting failed inside attacks ("Couldn't swap Conv2d.weight").
    conv, new = frozen(nn.Conv2d(3, 8, 3, padding=1)), frozen(nn.Conv2d(3, 8, 3, padding=1))
    x, bias = torch.randn(4, 3, 10, 10), conv.bias.detach().clone()
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        output_and_input_grad(conv, x)
        torch.utils.swap_tensors(conv.weight, nn.Parameter(new.weight.detach().clone(), requires_grad=False))
        got = [output_and_input_grad(conv, x)]
        conv.double().float()  # swaps every parameter under the setting
        conv.load_state_dict(new.state_dict())
        got.append(output_and_input_grad(conv, x))
    swapped = output_and_input_grad(lambda t: F.conv2d(t, new.weight, bias, padding=1), x)
    loaded = output_and_input_grad(new, x)
    for (out, grad), (out_expected, grad_expected) in zip(got, (swapped, loaded)):
        torch.testing.assert_close(out, out_expected, **CLOSE)
        torch.testing.assert_close(grad, grad_expected, **CLOSE)


def test_an_explicit_setting_for_part_of_a_model_leaves_the_rest_to_the_environment(monkeypatch):
    # An attack (enabled None) took the first enclosing decision it found for ALL the model's convolutions: an
    # explicit True on one layer packed every other layer too, off by default. Each module now follows its own
    # innermost explicit setting, else the variable.
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    monkeypatch.delenv(pc.ENV_SWITCH, raising=False)
    with pc.prepacked_conv(model[2], True), attack_context(model):
        assert _patching.active_replacement(model[2]) is pc._conv_forward
        assert _patching.active_replacement(model[0]) is None
    monkeypatch.setenv(pc.ENV_SWITCH, "1")
    with pc.prepacked_conv(model[2], False), attack_context(model):
        assert _patching.active_replacement(model[2]) is None
        assert _patching.active_replacement(model[0]) is pc._conv_forward


@pytest.mark.parametrize("dynamo", [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")])
def test_traces_and_onnx_exports_inside_an_attack_capture_atens_convolution(tmp_path, dynamo):
    """torch.jit.trace, and so torch.onnx.export's TorchScript exporter, failed on a model whose convolutions ran on
    packs (inside an attack under ROBUST_OPS_PREPACKED_CONV=1): an AssertionError from torch's memory-format check on
    traced sizes, or "unsupported input list type: Scalar?" from oneDNN's op. A trace now holds ATen's convolution, as
    for native_layers' layers; the default exporter captured it already."""
    torch.manual_seed(0)
    model = TinyCNN(1, 3).eval()
    x = torch.rand(2, 1, 8, 8)
    with pc.prepacked_conv(model, True), attack_context(model):
        assert pc.prepacked_conv_active(model)
        with expected_trace_warnings():
            graph = str(torch.jit.trace(model, x).inlined_graph)
        assert "aten::_convolution" in graph and "mkldnn" not in graph
        check_onnx_export(model, x, tmp_path, dynamo=dynamo)


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_a_bias_that_is_a_strided_view_gives_atens_outputs(view):
    """oneDNN's packed convolution read the bias as a dense vector whatever its strides: a bias that is a view (a
    pruned layer's ``bias[::2]``, a shared ``expand``ed one) gave outputs off by whole units, silently."""
    torch.manual_seed(0)
    conv = frozen(nn.Conv2d(3, 6, 3, padding=1))
    bias = torch.randn(12)[::2] if view == "strided" else torch.randn(1).expand(6)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    assert not conv.bias.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    expected = output_and_input_grad(conv, x)
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        got = output_and_input_grad(conv, x)
        assert type(conv(x.requires_grad_()).grad_fn).__name__ == "_PrepackedConv2dBackward"
    torch.testing.assert_close(got[0], expected[0], **CLOSE)
    torch.testing.assert_close(got[1], expected[1], **CLOSE)


@pytest.mark.parametrize("moved", ["weight", "bias", "sparse weight"])
def test_parameters_off_the_cpu_or_sparse_beside_a_cpu_input_run_atens_convolution(monkeypatch, moved):
    """A weight or bias on another device than the CPU input (a model moved in parts; meta stands for a GPU) or a
    sparse weight took the packed path and failed in to_mkldnn or in oneDNN ("itensor_view_from_dense expects CPU
    tensor input") instead of giving ATen's outcome."""
    calls = count_packs(monkeypatch)
    conv = frozen(nn.Conv2d(3, 4, 3, padding=1))
    name = moved.split()[-1]
    param = getattr(conv, name)
    setattr(conv, name, nn.Parameter(param.to_sparse() if "sparse" in moved else param.to("meta"),
                                     requires_grad=False))
    x = torch.randn(2, 3, 6, 6)

    def outcome():
        try:
            out = conv(x)
        except (RuntimeError, NotImplementedError) as err:
            return str(err).splitlines()[0]
        return out.device, out.shape, out.dtype

    expected = outcome()
    with pc.prepacked_conv(conv, True), pc.weight_pack_scope():
        assert outcome() == expected
    assert calls == []


def test_a_model_compiled_with_fullgraph_inside_an_attack_captures_atens_convolution():
    """torch.compile(fullgraph=True) of a model inside an attack with prepacked convolutions on failed at its first
    call ("Attempted to call function marked as skipped": the packed path's thread-local pack scope); without
    fullgraph the graph broke at every convolution. The graph now holds ATen's convolution, as for native layers."""
    torch.manual_seed(0)
    model = TinyCNN(1, 3).eval()
    x = torch.rand(2, 1, 8, 8)
    expected = model(x)
    with pc.prepacked_conv(model, True), attack_context(model):
        assert pc.prepacked_conv_active(model)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), expected)
