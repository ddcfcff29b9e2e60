"""The compiled common case (bnfast/_common_case.pxi) against the full Python path.

batch_norm_train / _infer / _backward first offer their arguments to a compiled
check that runs the kernel when every argument is already what the kernel
takes, and otherwise declines (None) so that the full path checks, converts
and raises. These tests pin down that it takes the plain calls (or the speed is
lost without a failure anywhere) and that on any arguments, plain or not, both
paths end the same way: the same results bit for bit, the same arrays written,
or the same exception with the same message.
"""
import numpy as np
import pytest

import bnfast
from bnfast import _kernels, _output_cache

FRESH = (_output_cache.empty, _output_cache.MIN_BYTES)   # the common case's last arguments

C = 5
DRAWS = 500


def _full_path_only(monkeypatch):
    for name in ("train_common_case", "infer_common_case", "backward_common_case"):
        monkeypatch.setattr(_kernels, name, lambda *args: None)


# --------------------------------------------------------------------------
# argument sets, drawn from a seed so that both paths get equal fresh copies
# --------------------------------------------------------------------------

def _x(rng, kind, dtype):
    """(x, axis) in one of the layouts a user passes."""
    if kind == "nchw":
        return rng.standard_normal((3, C, 4, 2)).astype(dtype), 1
    if kind == "nhwc view":   # channels_last memory seen with the channel at axis 1
        return rng.standard_normal((3, 4, 2, C)).astype(dtype).transpose(0, 3, 1, 2), 1
    if kind == "axis -1":
        return rng.standard_normal((3, 4, C)).astype(dtype), -1
    if kind == "2d":
        return rng.standard_normal((6, C)).astype(dtype), 1
    if kind == "middle axis":
        return rng.standard_normal((2, 3, C, 4)).astype(dtype), 2
    if kind == "length-1 axes":
        return rng.standard_normal((1, C, 1, 3)).astype(dtype), 1
    if kind == "strided":
        return rng.standard_normal((3, C, 8)).astype(dtype)[:, :, ::2], 1
    if kind == "fortran":
        return np.asfortranarray(rng.standard_normal((4, C, 3)).astype(dtype)), 1
    if kind == "one value per channel":
        return rng.standard_normal((1, C)).astype(dtype), 1
    if kind == "empty":
        return np.zeros((0, C, 2), dtype), 1
    if kind == "list":
        return rng.standard_normal((3, C)).tolist(), 1
    if kind == "int64":
        return rng.integers(0, 9, (3, C, 2)), 1
    if kind == "non-finite":
        x = rng.standard_normal((3, C, 2)).astype(dtype)
        x[1, 2, 1] = np.nan
        return x, 1
    raise AssertionError(kind)


# each knob is plain in 85 draws of 100, so that many calls are the common case and
# many differ from it in one or two ways
X_KINDS = ["nchw", "nhwc view", "axis -1", "2d", "middle axis", "length-1 axes"], [
    "strided", "fortran", "one value per channel", "empty", "list", "int64", "non-finite"]
PARAM_KINDS = ["plain"], ["none", "other dtype", "strided", "list", "wrong shape", "read-only"]
OUT_KINDS = ["none", "fresh", "in place"], [
    "overlaps a parameter", "other layout", "read-only", "other dtype", "wrong shape"]
SCALAR_KINDS = ["default"], ["int", "numpy float", "negative", "nan"]
AXIS_KINDS = ["as is", "negative"], ["numpy int", "float", "out of range"]


def _pick(rng, kinds):
    plain, unusual = kinds
    choices = plain if rng.random() < 0.85 else unusual
    return choices[rng.integers(len(choices))]


def _param(rng, kind, dtype, positive=False):
    p = rng.standard_normal(C).astype(dtype)
    if positive:
        p = np.abs(p) + 0.5
    if kind == "plain":
        return p
    if kind == "none":
        return None
    if kind == "other dtype":
        return p.astype(np.float64 if dtype == np.float32 else np.float32)
    if kind == "strided":
        return np.repeat(p, 2)[::2]
    if kind == "list":
        return p.tolist()
    if kind == "wrong shape":
        return np.resize(p, C + 1)
    if kind == "read-only":
        p.flags.writeable = False
        return p
    raise AssertionError(kind)


def _arguments(seed, call):
    """A reproducible argument set for `call`: (args, kwargs) built fresh each time."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[rng.integers(2)]
    x, axis = _x(rng, _pick(rng, X_KINDS), dtype)
    kinds = [_pick(rng, PARAM_KINDS) for _ in range(4)]
    weight, bias = _param(rng, kinds[0], dtype), _param(rng, kinds[1], dtype)
    mean, var = _param(rng, kinds[2], dtype), _param(rng, kinds[3], dtype, positive=True)

    out_kind = _pick(rng, OUT_KINDS)
    xa = np.asarray(x)
    out = None
    if out_kind == "fresh" and xa.size:
        out = np.empty_like(xa)
    elif out_kind == "in place":
        out = x
    elif out_kind == "overlaps a parameter" and xa.dtype.kind == "f":
        out = np.empty_like(xa)
        weight = out.reshape(-1)[:C] if out.size >= C else weight
    elif out_kind == "other layout" and xa.ndim > 1:
        out = np.empty(xa.shape[::-1], xa.dtype).T
    elif out_kind == "read-only":
        out = np.empty_like(xa)
        out.flags.writeable = False
    elif out_kind == "other dtype":
        out = np.empty(xa.shape, np.float16)
    elif out_kind == "wrong shape":
        out = np.empty(xa.shape + (1,), xa.dtype)

    scalar = _pick(rng, SCALAR_KINDS)
    eps = {"default": 1e-5, "int": 0, "numpy float": np.float64(1e-3), "negative": -1.0,
           "nan": float("nan")}[scalar]
    momentum = {"default": 0.1, "int": 1, "numpy float": np.float32(0.5), "negative": -0.1,
                "nan": float("nan")}[scalar]
    axis = {"as is": axis, "negative": axis - xa.ndim if axis >= 0 else axis,
            "numpy int": np.int64(axis), "float": float(axis),
            "out of range": xa.ndim + 1}[_pick(rng, AXIS_KINDS)]

    if call == "train":
        running = (1, 1, 0, 2)[rng.integers(4)]   # both, none, only one
        kwargs = dict(axis=axis, eps=eps, momentum=momentum, out=out,
                      running_mean=mean if running else None,
                      running_var=var if running == 1 else None)
        return (x, weight, bias), kwargs
    if call == "infer":
        return (x, weight, bias, mean, var), dict(axis=axis, eps=eps, out=out)
    dy = rng.standard_normal(xa.shape).astype(xa.dtype) if xa.dtype.kind == "f" else x
    if rng.integers(8) == 0 and xa.ndim > 1:   # dy laid out otherwise than x
        dy = np.asfortranarray(dy)
    if out_kind == "in place" and rng.integers(2):
        out = dy
    invstd = None if var is None else np.abs(var) + 0.5
    return (dy, x, weight, mean, invstd), dict(axis=axis, out=out)


CALLS = {"train": bnfast.batch_norm_train, "infer": bnfast.batch_norm_infer,
         "backward": bnfast.batch_norm_backward}


def _outcome(call, seed):
    """What a call did: its exception, or every array it returned or wrote."""
    args, kwargs = _arguments(seed, call)
    try:
        result = CALLS[call](*args, **kwargs)
    except Exception as err:   # noqa: BLE001 - the outcome compared is the exception
        return ("raised", type(err), str(err))
    arrays = result if isinstance(result, tuple) else (result,)
    written = [kwargs.get(k) for k in ("out", "running_mean", "running_var")]
    return ("returned", [np.array(a, copy=True) for a in arrays],
            [None if a is None else np.array(a, copy=True) for a in written],
            [a is kwargs.get("out") for a in arrays])


def _same(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "raised":
        return a[1:] == b[1:]
    for left, right in zip(a[1] + a[2], b[1] + b[2]):
        if (left is None) != (right is None):
            return False
        if left is not None and not (left.dtype == right.dtype and left.shape == right.shape
                                     and np.array_equal(left, right, equal_nan=True)):
            return False
    return a[3] == b[3]


@pytest.mark.parametrize("call", sorted(CALLS))
def test_common_case_ends_like_the_full_path(call, monkeypatch):
    with np.errstate(all="ignore"):
        common = [_outcome(call, seed) for seed in range(DRAWS)]
        _full_path_only(monkeypatch)
        full = [_outcome(call, seed) for seed in range(DRAWS)]
    differ = [seed for seed in range(DRAWS) if not _same(common[seed], full[seed])]
    assert not differ, f"seeds {differ[:5]}: {common[differ[0]][:3]} vs {full[differ[0]][:3]}"
    # the draws cover both ends: calls that return and calls that raise
    assert {o[0] for o in full} == {"returned", "raised"}


# --------------------------------------------------------------------------
# the common case is taken where it should be, and only there
# --------------------------------------------------------------------------

def _plain(dtype, layout):
    rng = np.random.default_rng(0)
    if layout == "nchw":
        x = rng.standard_normal((4, C, 3, 2)).astype(dtype)
    else:
        x = rng.standard_normal((4, 3, 2, C)).astype(dtype).transpose(0, 3, 1, 2)
    p = [rng.standard_normal(C).astype(dtype) for _ in range(4)]
    p[3] = np.abs(p[3]) + 1
    return x, p


@pytest.mark.parametrize("layout", ["nchw", "nhwc view"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_common_case_takes_plain_calls(dtype, layout):
    x, (w, b, m, v) = _plain(dtype, layout)
    dy = np.ones_like(x)
    for out in (None, np.empty_like(x), x.copy(order="K")):
        assert _kernels.infer_common_case(x, w, b, m, v, 1, 1e-5, out, 1, *FRESH) is not None
        assert _kernels.train_common_case(x, w, b, 1, 1e-5, 0.1, m.copy(), v.copy(), out,
                                          1, *FRESH) is not None
        assert _kernels.backward_common_case(dy, x, w, m, v, -3, out, 1, *FRESH) is not None
    y, status = _kernels.infer_common_case(x, None, None, m, v, 1, 0.0, None, 1, *FRESH)
    assert status == 0 and y.shape == x.shape and y.strides == np.empty_like(x).strides


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_common_case_declines_overlap_it_cannot_run(dtype):
    x, (w, b, m, v) = _plain(dtype, "nchw")
    out = np.empty_like(x)
    assert _kernels.infer_common_case(x, out.reshape(-1)[:C], b, m, v, 1, 1e-5, out, 1,
                                      *FRESH) is None
    in_place = x.reshape(-1).reshape(x.shape)   # another view of x's memory: in place
    assert _kernels.infer_common_case(x, w, b, m, v, 1, 1e-5, in_place, 1, *FRESH) is not None
    shifted = np.empty(x.size + 1, dtype)
    x_in = shifted[1:].reshape(x.shape)
    assert _kernels.infer_common_case(x_in, w, b, m, v, 1, 1e-5,
                                      shifted[:-1].reshape(x.shape), 1, *FRESH) is None
    stats = np.abs(np.random.default_rng(1).standard_normal(C + 1)).astype(dtype)
    assert _kernels.train_common_case(x, w, b, 1, 1e-5, 0.1, stats[:C], stats[1:], None,
                                      1, *FRESH) is None
    dy = np.ones_like(x)
    assert _kernels.backward_common_case(dy, x, w, m, v, 1, dy, 1, *FRESH) is not None
    assert _kernels.backward_common_case(dy, x, m, m, v, 1, m, 1, *FRESH) is None


def test_common_case_raises_the_full_paths_errors():
    x, (w, b, m, v) = _plain(np.float32, "nchw")
    x[0, 2, 0, 0] = np.inf
    rm, rv = m.copy(), v.copy()
    with pytest.raises(FloatingPointError, match=r"not finite in 1 of 5 channels \(2\)"):
        bnfast.batch_norm_train(x, w, b, running_mean=rm, running_var=rv)
    assert np.array_equal(rm, m) and np.array_equal(rv, v)
    v[3] = -1.0
    with pytest.raises(ValueError, match=r"unusable in 1 channel\(s\) \(3\)"):
        bnfast.batch_norm_infer(x, w, b, m, v)
