"""Large fresh outputs reuse the memory of outputs nothing refers to any more
(bnfast/_output_cache.py), and never memory that anything still reaches."""
import gc
import warnings

import numpy as np
import pytest

import bnfast
from bnfast import _output_cache
from bnfast._output_cache import MAX_IDLE, MIN_BYTES, OutputCache

SHAPE = (4, 8, 128, 256)            # 4 MiB of float32: just large enough to be kept
assert np.prod(SHAPE) * 4 == MIN_BYTES


def address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture
def cache():
    return OutputCache(64 * MIN_BYTES)


@pytest.fixture
def shared_cache():
    """The process-wide cache the functions use, emptied and at its default limit."""
    before = bnfast.output_cache_info()["limit_bytes"]
    bnfast.set_output_cache_limit(_output_cache.DEFAULT_LIMIT_BYTES)
    bnfast.empty_output_cache()
    yield
    bnfast.empty_output_cache()
    bnfast.set_output_cache_limit(before)


def test_dropped_output_is_handed_out_again(cache):
    a = cache.empty(SHAPE, np.float32)
    where = address(a)
    del a
    b = cache.empty(SHAPE, np.float32)
    assert address(b) == where
    assert b.shape == SHAPE and b.dtype == np.float32 and b.flags.c_contiguous
    assert b.flags.writeable and b.flags.owndata


def test_the_output_dropped_last_is_handed_out_first(cache):
    # the array written last is the likeliest to be still in the CPU's cache
    older, newer = cache.empty(SHAPE, np.float32), cache.empty(SHAPE, np.float32)
    where = address(newer)
    del older, newer
    assert address(cache.empty(SHAPE, np.float32)) == where


@pytest.mark.parametrize("keep", ["the array", "a view", "a reshaped view", "a memoryview",
                                  "a list holding it"])
def test_output_anything_still_reaches_is_never_reused(cache, keep):
    a = cache.empty(SHAPE, np.float32)
    a.fill(7.0)
    kept = {"the array": lambda: a, "a view": lambda: a[1:], "a reshaped view": lambda: a.reshape(-1),
            "a memoryview": lambda: memoryview(a), "a list holding it": lambda: [a]}[keep]()
    where = address(a)
    del a
    b = cache.empty(SHAPE, np.float32)
    assert address(b) != where
    b.fill(1.0)
    values = np.asarray(kept[0] if isinstance(kept, list) else kept)
    assert np.all(values == 7.0)


def test_output_kept_by_a_torch_tensor_is_never_reused(cache):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    a = cache.empty(SHAPE, np.float32)
    a.fill(3.0)
    t = torch.from_numpy(a)
    where = address(a)
    del a
    gc.collect()
    assert address(cache.empty(SHAPE, np.float32)) != where
    assert float(t.min()) == 3.0


def test_output_changed_in_place_is_not_handed_out_as_another_shape(cache):
    a = cache.empty(SHAPE, np.float32)
    where = address(a)
    a.shape = (SHAPE[0] * SHAPE[1],) + SHAPE[2:]
    del a
    assert address(cache.empty(SHAPE, np.float32)) != where
    b = cache.empty(SHAPE, np.float64)           # same bytes, other dtype: a fresh array
    assert b.dtype == np.float64


def test_small_outputs_are_not_kept(cache):
    a = cache.empty((MIN_BYTES // 8 - 1,), np.float64)
    assert a.nbytes < MIN_BYTES and cache.info()["arrays"] == 0


def test_kept_bytes_stay_under_the_limit():
    cache = OutputCache(3 * MIN_BYTES)
    held = [cache.empty(SHAPE, np.float32) for _ in range(5)]   # two beyond the limit
    assert cache.info()["bytes"] == 3 * MIN_BYTES
    del held
    # unused arrays make room for new ones, oldest first
    other = cache.empty((2,) + SHAPE, np.float32)
    assert cache.info()["bytes"] <= 3 * MIN_BYTES
    assert other.shape == (2,) + SHAPE


def test_limit_zero_keeps_nothing():
    cache = OutputCache(0)
    a = cache.empty(SHAPE, np.float32)
    where = address(a)
    del a
    assert cache.info()["arrays"] == 0
    cache.empty(SHAPE, np.float32)   # (may or may not land at the same address)
    assert cache.info()["hits"] == 0


def test_lowering_the_limit_lets_go_of_unused_outputs_at_once():
    cache = OutputCache(4 * MIN_BYTES)
    kept = [cache.empty(SHAPE, np.float32) for _ in range(4)]
    del kept[1:]                        # three unused, one held
    cache.set_limit(2 * MIN_BYTES)
    assert cache.info()["bytes"] == 2 * MIN_BYTES   # the held one and the newest unused
    assert any(entry[0] is kept[0] for entry in cache._entries)
    cache.set_limit(0)
    assert cache.info()["arrays"] == 0
    assert kept[0].shape == SHAPE       # the caller's array is untouched


def test_a_lowered_limit_holds_in_a_loop_of_reuses():
    cache = OutputCache(4 * MIN_BYTES)
    held = [cache.empty(SHAPE, np.float32) for _ in range(4)]
    cache.limit_bytes = MIN_BYTES       # lowered without set_limit, as a race would
    del held
    for _ in range(3):                  # every allocation a reuse
        a = cache.empty(SHAPE, np.float32)
        del a
    assert cache.info()["bytes"] <= MIN_BYTES


def test_reference_counts_are_read_as_this_interpreter_counts():
    # the cache compares with a count measured at import, not a constant
    assert _output_cache._ONLY_THE_CACHE == _output_cache._count_when_a_list_alone_holds()
    cache = OutputCache(4 * MIN_BYTES)
    a = cache.empty(SHAPE, np.float32)
    assert not cache._unused(0)
    del a
    assert cache._unused(0)


def test_idle_outputs_are_let_go(cache):
    cache.empty(SHAPE, np.float32)   # dropped at once, never asked for again
    for _ in range(MAX_IDLE + 1):
        cache.empty((2,) + SHAPE, np.float32)
    shapes = [entry[0].shape for entry in cache._entries]
    assert SHAPE not in shapes and cache.info()["arrays"] == 1


def test_empty_output_cache_lets_go_of_unused_outputs(shared_cache):
    x = np.ones(SHAPE, np.float32)
    y = bnfast.batch_norm_infer(x, None, None, np.zeros(8, np.float32), np.ones(8, np.float32))
    assert bnfast.output_cache_info()["arrays"] == 1
    del y
    assert bnfast.output_cache_info()["unused_arrays"] == 1
    bnfast.empty_output_cache()
    assert bnfast.output_cache_info()["arrays"] == 0


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_training_loop_reuses_its_outputs(shared_cache, layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal(SHAPE, dtype=np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    before = bnfast.output_cache_info()
    first = None
    for step in range(4):
        y, mean, invstd = bnfast.batch_norm_train(x, w, b)
        dx, _, _ = bnfast.batch_norm_backward(dy, x, w, mean, invstd)
        if first is None:
            first = ({address(y), address(dx)}, y.strides, dx.strides)
            expected = (y.copy(), dx.copy())
        else:   # the same two blocks of memory, laid out as x, with this step's values
            assert ({address(y), address(dx)}, y.strides, dx.strides) == first
            assert np.array_equal(y, expected[0]) and np.array_equal(dx, expected[1])
        del y, dx
    after = bnfast.output_cache_info()
    assert after["hits"] - before["hits"] == 6 and after["misses"] - before["misses"] == 2


def test_outputs_held_across_steps_are_distinct(shared_cache):
    x = np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    m, v = np.zeros(8, np.float32), np.ones(8, np.float32)
    outputs = [bnfast.batch_norm_infer(x, None, None, m, v) for _ in range(3)]
    assert len({address(y) for y in outputs}) == 3
    assert all(np.array_equal(y, outputs[0]) for y in outputs)


def test_set_output_cache_limit_rejects_bad_values():
    with pytest.raises(TypeError, match="n_bytes must be an int"):
        bnfast.set_output_cache_limit(1.5)
    with pytest.raises(ValueError, match="n_bytes must be >= 0"):
        bnfast.set_output_cache_limit(-1)


@pytest.mark.parametrize("text, limit", [("0", 0), ("12345", 12345), (" ", None),
                                         ("-5", None), ("1GB", None)])
def test_limit_from_the_environment(monkeypatch, text, limit):
    monkeypatch.setenv("BNFAST_OUTPUT_CACHE_BYTES", text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _output_cache._limit_from_environment()
    if limit is None:
        assert got == _output_cache.DEFAULT_LIMIT_BYTES
        assert bool(caught) == bool(text.strip())
        if caught:
            assert "BNFAST_OUTPUT_CACHE_BYTES" in str(caught[0].message)
    else:
        assert got == limit and not caught
