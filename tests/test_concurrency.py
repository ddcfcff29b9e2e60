"""Every public function called from 8 Python threads at once, while another
thread keeps changing bnfast.set_num_threads (and the instruction set, where the
CPU offers two), gives the serial answer.

Each call gets its own outputs and running statistics (sharing a writable array
between threads is a race in any library); the inputs are shared and read by
all threads at once, and must come out unchanged. Results are compared with
the serial ones within a tight tolerance, not bitwise: a different thread count
sums in a different order (results for one fixed thread count are bitwise
equal, see test_runtime.py).
"""
import threading
import time

import numpy as np
import pytest

import bnfast
from bnfast import _runtime
from bnfast import functional as F
from bnfast import nn

N_WORKERS = 8
ROUNDS = 2
THREAD_COUNTS = [1, 2, 3, 4, None, -1, 8]


def make_inputs():
    """Shared read-only inputs large enough for thread teams (>= 4 x 32768 values)."""
    rng = np.random.default_rng(0)
    x_cf = (0.5 + 2 * rng.standard_normal((8, 16, 32, 32))).astype(np.float32)
    x_cl = np.ascontiguousarray(np.moveaxis(x_cf, 1, -1))       # channels-last
    x_2d = (3 + rng.standard_normal((2048, 64))).astype(np.float64)
    arrays = dict(
        x_cf=x_cf, dy_cf=rng.standard_normal(x_cf.shape).astype(np.float32),
        x_cl=x_cl, dy_cl=rng.standard_normal(x_cl.shape).astype(np.float32),
        x_2d=x_2d, dy_2d=rng.standard_normal(x_2d.shape),
        w16=(1 + 0.3 * rng.standard_normal(16)).astype(np.float32),
        b16=rng.standard_normal(16).astype(np.float32),
        m16=rng.standard_normal(16).astype(np.float32),
        v16=rng.uniform(0.5, 2, 16).astype(np.float32),
        w64=1 + 0.3 * rng.standard_normal(64), b64=rng.standard_normal(64),
        conv_W=rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        conv_b=rng.standard_normal(16).astype(np.float32),
        lin_W=rng.standard_normal((16, 10)).astype(np.float32),
        convT_W=rng.standard_normal((8, 8, 3, 3)).astype(np.float32),
        pre_W=rng.standard_normal((4, 8, 3, 3)).astype(np.float32),
    )
    for a in arrays.values():
        a.flags.writeable = False          # a write from any thread would raise
    return arrays


def tasks(a):
    """name -> a call returning a tuple of arrays/numbers; each call owns its outputs."""

    def train(x, axis, out=False):
        def run():
            rm, rv = a["m16"].copy(), a["v16"].copy()
            y, mean, invstd = bnfast.batch_norm_train(
                x, a["w16"], a["b16"], axis=axis, running_mean=rm, running_var=rv,
                out=np.empty_like(x) if out else None)
            return y, mean, invstd, rm, rv
        return run

    def backward(x, dy, axis, out=False):
        def run():
            _, mean, invstd = bnfast.batch_norm_train(x, a["w16"], axis=axis)
            return bnfast.batch_norm_backward(dy, x, a["w16"], mean, invstd, axis=axis,
                                              out=np.empty_like(x) if out else None)
        return run

    def stepwise(x, dy, axis):
        def run():
            count, mean, m2 = F.batch_norm_stats(x, axis=axis)
            half = x.shape[0] // 2
            parts = [F.batch_norm_stats(x[:half], axis=axis),
                     F.batch_norm_stats(x[half:], axis=axis)]
            merged = F.merge_stats([p[0] for p in parts], [p[1] for p in parts],
                                   [p[2] for p in parts])
            invstd = 1 / np.sqrt(m2 / count + 1e-5)
            y = F.batch_norm_apply(x, mean, invstd, a["w16"], a["b16"], axis=axis)
            sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
            dx = F.batch_norm_backward_apply(dy, x, mean, invstd, a["w16"], sum_dy,
                                             sum_dy_xhat, count, axis=axis)
            return (count, mean, m2, merged[1], merged[2], y, sum_dy, sum_dy_xhat, dx)
        return run

    def layer(cls, x, dy, axis):
        def run():
            bn = cls(x.shape[axis], axis=axis, dtype=x.dtype, momentum=None)
            bn.weight[...] = a["w64"] if x.dtype == np.float64 else a["w16"]
            y1 = bn(x)
            dx = bn.backward(dy)
            state = bn.state_dict()
            bn.eval()
            y2 = bn(x)
            fresh = cls(x.shape[axis], axis=axis, dtype=x.dtype)
            fresh.load_state_dict(state)
            return (y1, dx, bn.grad_weight, bn.grad_bias, y2, fresh.eval()(x),
                    *state.values())
        return run

    def folds():
        return (*bnfast.fold_conv_bn(a["conv_W"], a["conv_b"], a["w16"], a["b16"],
                                     a["m16"], a["v16"], 1e-5),
                *bnfast.fold_linear_bn(a["lin_W"], None, a["w16"], a["b16"], a["m16"],
                                       a["v16"], 1e-5),
                *bnfast.fold_conv_transpose_bn(a["convT_W"], None, a["w16"], a["b16"],
                                               a["m16"], a["v16"], 1e-5, groups=2),
                *bnfast.fold_bn_conv(a["pre_W"], a["conv_b"][:4], a["w16"][:8],
                                     a["b16"][:8], a["m16"][:8], a["v16"][:8], 1e-5),
                *F.scale_shift(a["w16"], a["b16"], a["m16"], a["v16"], 1e-5))

    def net():
        rng = np.random.default_rng(1)
        model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, rng=rng), nn.BatchNorm2d(8),
                              nn.ReLU(), nn.GlobalAvgPool2d(), nn.Flatten(),
                              nn.Linear(8, 4, rng=rng), nn.BatchNorm1d(4))
        y = model(a["x_cf"][:4])
        dx = model.backward(np.ones_like(y))
        return y, dx, model.eval()(a["x_cf"][:4])

    return {
        "train_cf": train(a["x_cf"], 1), "train_cl": train(a["x_cl"], -1),
        "train_cf_out": train(a["x_cf"], 1, out=True),
        "infer_cf": lambda: (bnfast.batch_norm_infer(a["x_cf"], a["w16"], a["b16"], a["m16"],
                                                     a["v16"]),),
        "infer_cl_out": lambda: (bnfast.batch_norm_infer(
            a["x_cl"], a["w16"], a["b16"], a["m16"], a["v16"], axis=-1,
            out=np.empty_like(a["x_cl"])),),
        "backward_cf": backward(a["x_cf"], a["dy_cf"], 1),
        "backward_cl_out": backward(a["x_cl"], a["dy_cl"], -1, out=True),
        "stepwise_cf": stepwise(a["x_cf"], a["dy_cf"], 1),
        "stepwise_cl": stepwise(a["x_cl"], a["dy_cl"], -1),
        "layer_2d": layer(bnfast.BatchNorm2d, a["x_cf"], a["dy_cf"], 1),
        "layer_2d_cl": layer(bnfast.BatchNorm2d, a["x_cl"], a["dy_cl"], -1),
        "layer_1d": layer(bnfast.BatchNorm1d, a["x_2d"], a["dy_2d"], 1),
        "folds": folds,
        "net": net,
    }


# tasks whose inputs are float64; the others' results (float64 sums too) carry
# float32 rounding, which differs between instruction sets and thread counts
FLOAT64_INPUTS = {"layer_1d"}


def assert_same(name, got, want):
    assert len(got) == len(want), name
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}[{i}]"
        tol = 1e-10 if name in FLOAT64_INPUTS and w.dtype == np.float64 else 1e-4
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{name}[{i}]")


@pytest.fixture
def restore_threads():
    isa = _runtime.get_isa()
    yield
    bnfast.set_num_threads(None)
    _runtime.set_isa(isa)


def test_every_public_function_from_8_threads_while_thread_count_changes(restore_threads):
    arrays = make_inputs()
    work = tasks(arrays)
    snapshot = {k: v.copy() for k, v in arrays.items()}
    expected = {}
    for n in (1, None):                     # serial answers, on one thread and on all
        bnfast.set_num_threads(n)
        for name, call in work.items():
            result = call()
            if name in expected:
                assert_same(name, result, expected[name])
            expected[name] = result

    start = threading.Barrier(N_WORKERS + 1)
    done = threading.Event()
    errors, results = [], []
    changes = [0]

    def worker(seed):
        order = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(ROUNDS):
                for name in order.permutation(sorted(work)):
                    results.append((name, work[name]()))
        except Exception as err:          # reported below with its thread
            errors.append((seed, repr(err)))

    isas = _runtime.available_isas()

    def change_thread_count():
        """Cycle the thread count, and the instruction set where there are two."""
        start.wait()
        i = 0
        while not done.is_set():
            bnfast.set_num_threads(THREAD_COUNTS[i % len(THREAD_COUNTS)])
            _runtime.set_isa(isas[i % len(isas)])
            i += 1
            time.sleep(0.0005)
        changes[0] = i

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(N_WORKERS)]
    changer = threading.Thread(target=change_thread_count)
    for t in threads + [changer]:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    changer.join()
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors
    assert len(results) == N_WORKERS * ROUNDS * len(work)
    assert changes[0] > 1, "the thread count never changed during the run"
    for name, result in results:
        assert_same(name, result, expected[name])
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, snapshot[name], err_msg=name)


def test_set_num_threads_from_many_threads_leaves_a_valid_setting(restore_threads):
    """Concurrent set_num_threads calls never leave a value a kernel cannot use."""
    barrier = threading.Barrier(8)
    errors = []

    def setter(i):
        try:
            barrier.wait()
            for j in range(200):
                bnfast.set_num_threads(THREAD_COUNTS[(i + j) % len(THREAD_COUNTS)])
                assert bnfast.get_num_threads() >= 1
        except Exception as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=setter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    x = np.random.default_rng(0).standard_normal((64, 8, 256)).astype(np.float32)
    y, _, _ = bnfast.batch_norm_train(x)
    bnfast.set_num_threads(1)
    np.testing.assert_allclose(y, bnfast.batch_norm_train(x)[0], rtol=1e-5, atol=1e-5)
