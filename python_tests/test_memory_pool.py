"""The scoped caching CPU allocator (robust_ops.memory): reuse inside, the default allocator outside, memory that
crosses the boundary freed correctly, results unchanged."""

import os
import threading

import pytest
import torch
from torch import nn

import robust_ops
from robust_ops import attacks
from robust_ops.memory import cpu_memory_pool, cpu_memory_pool_stats, library_pool, pool_enabled_by_default

BIG = 1 << 16  # floats: 256 KiB, above the pool's 64 KiB threshold


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 3)).eval()


def test_off_outside_and_reuses_inside():
    assert cpu_memory_pool_stats().depth == 0
    before = cpu_memory_pool_stats()
    with cpu_memory_pool():
        assert cpu_memory_pool_stats().depth == 1
        for _ in range(5):
            t = torch.empty(BIG)
            t.fill_(1.0)
            del t
        inside = cpu_memory_pool_stats()
        assert inside.hits - before.hits >= 4  # the first allocation misses, the rest reuse its block
        assert inside.cached_bytes >= BIG * 4
    after = cpu_memory_pool_stats()
    assert after.depth == 0 and after.cached_bytes == 0
    torch.empty(BIG)
    assert cpu_memory_pool_stats().misses == after.misses  # allocations after the block bypass the pool


def test_nesting_keeps_the_cache_until_the_outermost_exit():
    with cpu_memory_pool():
        with cpu_memory_pool():
            del_me = torch.empty(BIG)
            del del_me
        assert cpu_memory_pool_stats().depth == 1
        assert cpu_memory_pool_stats().cached_bytes > 0
    assert cpu_memory_pool_stats().depth == 0
    assert cpu_memory_pool_stats().cached_bytes == 0


def test_disabled_context_does_nothing():
    with cpu_memory_pool(enabled=False):
        assert cpu_memory_pool_stats().depth == 0


def test_an_error_inside_leaves_the_pool():
    with pytest.raises(ZeroDivisionError), cpu_memory_pool():
        1 / 0
    assert cpu_memory_pool_stats().depth == 0


# (no GPU needed: the device only decides); meta: no memory to pool (mutation testing: `!= "cuda"` survived)
@pytest.mark.parametrize("device, depth", [("cpu", 1), ("cuda", 0), ("meta", 0)])
def test_library_pool_is_for_cpu_work(monkeypatch, device, depth):
    monkeypatch.delenv("ROBUST_OPS_CPU_POOL", raising=False)
    with library_pool(device):
        assert cpu_memory_pool_stats().depth == depth


def test_library_pool_names_itself_for_a_bad_device():
    # (mutation testing of memory: torch.device's own "Invalid device string" instead survived)
    with pytest.raises(ValueError, match=r"^library_pool: expected device to be a torch.device or a string such as "
                                         r"'cpu' or 'cuda:0', got 'gpu'$"):
        library_pool("gpu")


def test_tensors_crossing_the_boundary_stay_valid():
    outside = torch.arange(BIG, dtype=torch.float32)  # default allocator, freed inside the pool
    with cpu_memory_pool():
        inside = torch.arange(BIG, dtype=torch.float32) * 2  # pool block, outlives the pool
        del outside
        small = torch.ones(10)  # below the threshold: the default allocator
    assert torch.equal(inside, torch.arange(BIG, dtype=torch.float32) * 2)
    del inside, small
    with cpu_memory_pool():  # a fresh activation after blocks were freed outside it
        x = torch.randn(4, 1, 32, 32)
        m = small_cnn()
        m(x).sum()


def test_a_tensor_resized_after_the_pool_ended_is_no_pool_miss():
    # its storage keeps the pool's allocator, which serves it from the system like the default one: no pooled
    # allocation, so the miss count (pooled allocations served from the system) stays as it was
    with cpu_memory_pool():
        t = torch.ones(BIG)
    before = cpu_memory_pool_stats()
    t.resize_(4 * BIG)
    t[-1] = 3
    assert cpu_memory_pool_stats() == before and float(t[:BIG].sum()) == BIG


def test_sizes_shrinking_reuse_larger_blocks():
    with cpu_memory_pool():
        del_me = torch.empty(BIG * 4)
        del del_me
        hits = cpu_memory_pool_stats().hits
        t = torch.empty(BIG * 3)  # 3/4 of the cached block: served from it
        assert cpu_memory_pool_stats().hits == hits + 1
        t.fill_(0)


@pytest.mark.parametrize("limit_mb, cached_mb", [(None, 1.5), ("1", 0.75)])
def test_growing_sizes_keep_the_smaller_blocks_up_to_the_limit(monkeypatch, limit_mb, cached_mb):
    """The cost docs/memory-pool.md states: a growing request finds every cached block too small, so each size
    gets a new block and the older ones stay cached until the block ends; ROBUST_OPS_CPU_POOL_LIMIT_MB bounds
    them (measured there: 517 MB cached after batches 4..16, 127 MB with the limit at 128)."""
    if limit_mb is None:
        monkeypatch.delenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", raising=False)
    else:
        monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", limit_mb)
    with cpu_memory_pool():
        misses = cpu_memory_pool_stats().misses
        for blocks in (1, 2, 3):  # 256, 512, 768 KiB: none fits in a smaller cached block
            torch.empty(BIG * blocks).fill_(0)
        inside = cpu_memory_pool_stats()
        assert inside.misses == misses + 3 and inside.cached_bytes == int(cached_mb * (1 << 20))
    assert cpu_memory_pool_stats().cached_bytes == 0


def test_requests_of_64_kib_and_more_are_pooled():
    """docs/memory-pool.md: requests of 64 KiB or more are pooled, 64 KiB itself too; one byte less goes to the
    default allocator (mutation testing: a threshold excluding 64 KiB survived)."""
    with cpu_memory_pool():
        start = cpu_memory_pool_stats()
        torch.empty(65535, dtype=torch.uint8)
        assert cpu_memory_pool_stats() == start
        torch.empty(65536, dtype=torch.uint8)
        after = cpu_memory_pool_stats()
        assert after.misses == start.misses + 1 and after.cached_bytes == start.cached_bytes + 65536


def test_requests_are_rounded_up_to_an_eighth_of_their_power_of_two():
    """64 KiB + 1 byte takes a 72 KiB block, 200 000 bytes one of 212 992 (13/8 of 128 KiB): the size classes of
    docs/memory-pool.md (mutation testing: no rounding survived)."""
    with cpu_memory_pool():
        start = cpu_memory_pool_stats().cached_bytes
        torch.empty(65537, dtype=torch.uint8)
        torch.empty(200000, dtype=torch.uint8)
        assert cpu_memory_pool_stats().cached_bytes == start + (72 << 10) + 212992


def test_a_cached_block_serves_requests_down_to_half_its_size():
    """A cached block serves a request of at least half its capacity (docs/memory-pool.md: "freed blocks of at most
    twice their size"): exactly half is a hit, 224 KiB leaves the 512 KiB block alone (mutation testing: the bound
    made exclusive, and dropped, survived)."""
    with cpu_memory_pool():
        torch.empty(BIG * 2)  # a 512 KiB block, cached
        before = cpu_memory_pool_stats()
        half = torch.empty(BIG)  # 256 KiB: served from it
        assert cpu_memory_pool_stats().hits == before.hits + 1 and cpu_memory_pool_stats().cached_bytes == 0
        del half
        torch.empty(224 << 10, dtype=torch.uint8)  # less than half: a new block
        after = cpu_memory_pool_stats()
        assert after.hits == before.hits + 1 and after.misses == before.misses + 1
        assert after.cached_bytes == (512 + 224) << 10


def test_the_cache_limit_is_inclusive(monkeypatch):
    """ROBUST_OPS_CPU_POOL_LIMIT_MB=1 keeps blocks adding up to exactly 1 MB (mutation testing: a strict limit
    survived; the growing-sizes test never reaches its limit exactly)."""
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", "1")
    with cpu_memory_pool():
        torch.empty(BIG).fill_(0)
        torch.empty(BIG * 3).fill_(0)  # 256 + 768 KiB
        assert cpu_memory_pool_stats().cached_bytes == 1 << 20


def test_pool_blocks_are_64_byte_aligned():
    """Pool blocks have c10::alloc_cpu's 64-byte alignment (docs/memory-pool.md), so oneDNN and the vectorised
    kernels take the same paths as outside the pool (mutation testing: a 16-byte alignment survived)."""
    with cpu_memory_pool():
        blocks = [torch.empty(65536 + 16 * i, dtype=torch.uint8) for i in range(8)]
        assert cpu_memory_pool_stats().in_use_bytes >= 8 * 65536  # pool blocks, not the default allocator's
        assert [t.data_ptr() % 64 for t in blocks] == [0] * 8


def test_an_attack_and_fit_leave_nothing_cached_or_held():
    """What docs/memory-pool.md promises after an attack or fit returns: the cache freed and no pool block held."""
    from torch.utils.data import TensorDataset

    from robust_ops import defenses
    from robust_ops.train import fit

    model = small_cnn()
    x, y = torch.rand(16, 1, 32, 32), torch.randint(0, 3, (16,))
    hits = cpu_memory_pool_stats().hits
    attacks.pgd(model, x, y, eps=0.1, steps=2)
    after_attack = cpu_memory_pool_stats()
    assert after_attack.hits > hits  # the attack did use the pool
    assert (after_attack.depth, after_attack.cached_bytes, after_attack.in_use_bytes) == (0, 0, 0)
    fit(model, defenses.build("at", eps=0.1, step_size=0.05, steps=1), TensorDataset(x, y), epochs=1, batch_size=8,
        progress=False)
    after_fit = cpu_memory_pool_stats()
    assert after_fit.hits > after_attack.hits
    assert (after_fit.depth, after_fit.cached_bytes, after_fit.in_use_bytes) == (0, 0, 0)


def test_results_identical_with_and_without_pool(monkeypatch):
    model = small_cnn()
    torch.manual_seed(1)
    x, y = torch.rand(6, 1, 32, 32), torch.randint(0, 3, (6,))
    kwargs = dict(eps=8 / 255, alpha=2 / 255, steps=4, emit=(2, 4), random_start=False)
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL", "0")
    assert not pool_enabled_by_default()
    plain, plain_its = attacks.pgd(model, x, y, **kwargs)
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL", "1")
    misses = cpu_memory_pool_stats().misses + cpu_memory_pool_stats().hits
    pooled, pooled_its = attacks.pgd(model, x, y, **kwargs)
    assert cpu_memory_pool_stats().misses + cpu_memory_pool_stats().hits > misses  # the attack ran in the pool
    assert torch.equal(plain, pooled) and torch.equal(plain_its, pooled_its)
    # A convolution's gradient (oneDNN buffers) inside and outside the pool
    xg = x.clone().requires_grad_(True)
    (g_out,) = torch.autograd.grad(model(xg).sum(), xg)
    with cpu_memory_pool():
        xg2 = x.clone().requires_grad_(True)
        (g_in,) = torch.autograd.grad(model(xg2).sum(), xg2)
    assert torch.equal(g_out, g_in)


def env_switches():
    from robust_ops import native_layers, prepacked_conv

    return [("ROBUST_OPS_CPU_POOL", pool_enabled_by_default, True),
            (native_layers.ENV_SWITCH, native_layers.native_layers_enabled_by_default, True),
            (prepacked_conv.ENV_SWITCH, prepacked_conv.prepacked_conv_enabled_by_default, False)]


@pytest.mark.parametrize("index", range(3), ids=["pool", "native_layers", "prepacked_conv"])
def test_env_switches_parse_alike(monkeypatch, index):
    name, enabled, default = env_switches()[index]
    monkeypatch.delenv(name, raising=False)
    assert enabled() is default
    for value, expected in [("", default), (" ", default), ("1", True), ("true", True), ("On", True), ("YES", True),
                            ("0", False), ("false", False), (" off ", False), ("No", False)]:
        monkeypatch.setenv(name, value)
        assert enabled() is expected, value
    for value in ("maybe", "2", "enabled", " Off!"):  # the message quotes the value as set
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"^robust_ops: expected \${name} to be one of 1/true/on/yes \(on\) "
                                             rf"or 0/false/off/no \(off\), got '{value}'$"):
            enabled()


@pytest.mark.parametrize("switch", ["cpu_memory_pool", "native_layers", "prepacked_conv"])
@pytest.mark.parametrize("value", ["false", "off", 0, 1.0])
def test_switch_contexts_take_only_true_or_false(switch, value):
    """``with native_layers(model, "false"):`` swapped the layers (bool("false") is True), prepacked_conv(model,
    "no") turned the non-bitwise convolutions on and cpu_memory_pool("false") started the pool."""
    from robust_ops.native_layers import native_layers
    from robust_ops.prepacked_conv import prepacked_conv, prepacked_conv_active

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    context = cpu_memory_pool(value) if switch == "cpu_memory_pool" else {
        "native_layers": native_layers, "prepacked_conv": prepacked_conv}[switch](model, value)
    optional = "" if switch == "cpu_memory_pool" else " or None"
    with pytest.raises(TypeError, match=rf"^{switch}: expected enabled to be True or False{optional}, got "):
        with context:
            pass
    assert cpu_memory_pool_stats().depth == 0 and "forward" not in model[1].__dict__
    assert not prepacked_conv_active(model)


# 2**43 MB is 2**63 bytes: its byte count would not fit (mutation testing: dropping the upper bound survived)
@pytest.mark.parametrize("value", ["", "abc", "-5", "4GB", str(1 << 43)])
def test_bad_cache_limit_is_refused_before_the_pool_starts(monkeypatch, value):
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", value)
    with pytest.raises(RuntimeError, match="ROBUST_OPS_CPU_POOL_LIMIT_MB: expected a whole number of megabytes"):
        with cpu_memory_pool():
            pass
    monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", "0")  # valid: nothing is cached, the pool still works
    with cpu_memory_pool():
        torch.empty(BIG).fill_(1)
    assert torch.empty(BIG).fill_(2).sum() == 2 * BIG  # the default allocator is back


# (mutation testing of memory: taking spaces and tabs only, not C's other leading white space, survived; so did
# returning 0 for an unset variable and for every value)
@pytest.mark.parametrize("value", ["", "abc", "-5", "4GB", str(1 << 43), str((1 << 43) - 1), " 12", "+3", "-0", "0",
                                   "12 ", "0x10", "1e3", "\u0663", "\n\v\f\r\t 7", None])
def test_the_cache_limit_check_before_any_work_agrees_with_the_pools(monkeypatch, value):
    """memory.pool_limit_mb (the command line's check before any work) takes what the pool takes, and only that,
    and reads it as the number it is (None: unset)."""
    from robust_ops.memory import pool_limit_mb

    if value is None:
        monkeypatch.delenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", raising=False)
    else:
        monkeypatch.setenv("ROBUST_OPS_CPU_POOL_LIMIT_MB", value)
    try:
        with cpu_memory_pool():
            pass
        pool_takes = True
    except RuntimeError:
        pool_takes = False
    try:
        assert pool_limit_mb() == (None if value is None else int(value))
        check_takes = True
    except ValueError as err:
        assert str(err) == ("robust_ops: expected $ROBUST_OPS_CPU_POOL_LIMIT_MB to be a whole number of megabytes >= 0 "
                            f"(0 caches nothing), got {value!r}")
        check_takes = False
    assert check_takes == pool_takes


def test_threads_allocate_concurrently():
    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for _ in range(50):
                a = torch.rand(BIG + seed * 1000, generator=g)
                b = a * 2
                assert torch.equal(b / 2, a)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    with cpu_memory_pool():
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert cpu_memory_pool_stats().depth == 0


def test_lazy_submodule():
    assert robust_ops.memory.cpu_memory_pool is cpu_memory_pool


class DepthProbe(nn.Module):
    """Records the pool depth at every forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 2)
        self.depths = []

    def forward(self, x):
        self.depths.append(cpu_memory_pool_stats().depth)
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("switch, inside", [("1", True), ("0", False)])
def test_fit_and_attacks_run_inside_the_pool(monkeypatch, switch, inside):
    from torch.utils.data import TensorDataset

    from robust_ops import defenses
    from robust_ops.train import fit

    monkeypatch.setenv("ROBUST_OPS_CPU_POOL", switch)
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(8, 1, 4, 4), torch.randint(0, 2, (8,)))
    model = DepthProbe()
    fit(model, defenses.build("at", eps=0.1, step_size=0.05, steps=1), data, epochs=1, batch_size=4, progress=False)
    assert model.depths and all((d >= 1) == inside for d in model.depths)
    assert cpu_memory_pool_stats().depth == 0


def test_memory_profiler_sees_pool_blocks():
    from torch.profiler import ProfilerActivity, profile

    with cpu_memory_pool():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            t = torch.empty(BIG)
            del t
    usage = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
    assert usage.get("aten::empty", 0) >= BIG * 4


def _child_allocates(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP is not fork-safe once the parent has used it
    t = torch.arange(BIG, dtype=torch.float32) * 3
    queue.put(float(t[-1]))


def test_forked_child_inside_the_pool_allocates():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with cpu_memory_pool():
        keep = torch.empty(BIG)  # pool blocks exist when the child is forked
        queue = ctx.Queue()
        child = ctx.Process(target=_child_allocates, args=(queue,))
        child.start()
        value = queue.get(timeout=60)
        child.join(timeout=60)
        del keep
    assert child.exitcode == 0 and value == (BIG - 1) * 3


@pytest.mark.slow
def test_children_forked_while_another_thread_allocates_inside_the_pool():
    # fork copies the pool's maps as they are: one forked while another thread was changing them crashed (SIGSEGV,
    # SIGABRT) in about 1 of 160 children, so ~400 forks catch it nearly always
    import os
    import signal
    import time

    stop, statuses = threading.Event(), []

    def allocate():
        keep = []
        for i in range(10**9):
            if stop.is_set():
                break
            keep.append(torch.empty(65536 + i % 97 * 4096, dtype=torch.uint8))  # many sizes: the maps change
            if len(keep) > 300:
                del keep[:150]

    with cpu_memory_pool():
        thread = threading.Thread(target=allocate)
        thread.start()
        try:
            deadline = time.monotonic() + 40
            while len(statuses) < 400 and time.monotonic() < deadline:
                pid = os.fork()
                if pid == 0:
                    signal.alarm(10)  # a deadlocked child dies rather than hangs the test
                    try:
                        for _ in range(2):
                            blocks = [torch.empty(65536 + k * 4096, dtype=torch.uint8) for k in range(200)]
                            del blocks
                    finally:
                        os._exit(0)
                statuses.append(os.waitpid(pid, 0)[1])
        finally:
            stop.set()
            thread.join()
    assert len(statuses) >= 100 and not [s for s in statuses if s]


def test_a_block_whose_pool_stayed_off_does_not_exit_the_enclosing_one(monkeypatch):
    """When another library's CPU allocator is installed the pool stays off (the C++ enter returns False) and the
    block must not exit: an exit there would end an enclosing pool early (depth 0 inside it) and make that one's exit
    raise "exit without a matching enter" (mutation testing of memory.py: exiting on ``enabled`` survived)."""
    import robust_ops.memory as memory

    with cpu_memory_pool():
        monkeypatch.setattr(memory, "_enter", lambda: False)  # as with a foreign allocator installed
        with cpu_memory_pool():
            pass
        assert cpu_memory_pool_stats().depth == 1
        monkeypatch.undo()
    assert cpu_memory_pool_stats().depth == 0


def test_an_attack_in_a_process_without_torch_dynamo_does_not_import_it():
    """The pool's enter and exit are marked for torch.compile to run eagerly, and torch._disable_dynamo imported
    torch._dynamo at their first call: the first attack of a process that had not imported it (no torchvision)
    took 157 MB of resident memory and 3-5 s more than the next. Nothing can be compiling before that import."""
    from utils import run_python

    code = ("import sys, torch, robust_ops\n"
            "from robust_ops import attacks\n"
            "from robust_ops.memory import cpu_memory_pool_stats\n"
            "depths = []\n"
            "class Net(torch.nn.Linear):\n"
            "    def forward(self, x):\n"
            "        depths.append(cpu_memory_pool_stats().depth)\n"
            "        return super().forward(x.flatten(1))\n"
            "attacks.pgd(Net(16, 3), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), eps=0.1, steps=2)\n"
            "print(min(depths), 'torch._dynamo' in sys.modules)\n")
    # 1: the attack ran inside the pool
    assert run_python(code, {**os.environ, "ROBUST_OPS_CPU_POOL": "1"}).split() == ["1", "False"]
