"""bnfast._validation: the checks a backend reuses work on any array object with
.dtype/.shape/.ndim (as a cupy.ndarray has) without converting it to numpy."""
import numpy as np
import pytest

from bnfast import _validation as V


class DeviceArray:
    """Stands for a cupy.ndarray: attributes only; converting it to numpy fails."""

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __array__(self, *args, **kwargs):
        raise AssertionError("a backend-neutral check converted the array to numpy")


def test_dtype_checks_read_the_dtype_only_and_name_the_array_module():
    V.check_float_dtype(DeviceArray((4, 3), np.float32), "x")
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got int64; cast with "
                                        r"x.astype\(cupy.float32\)"):
        V.check_float_dtype(DeviceArray((4, 3), np.int64), "x", xp="cupy")
    with pytest.raises(TypeError, match=r"weight must be a floating array, got complex64"):
        V.check_floating(DeviceArray((3,), np.complex64), "weight")
    with pytest.raises(TypeError, match=r"weight is float64 but x is float32, and casting would "
                                        r"lose precision; pass weight.astype\(cupy.float32\)"):
        V.check_castable(DeviceArray((3,), np.float64), "weight", np.dtype(np.float32),
                         xp="cupy")


def test_shape_checks_read_the_shape_only():
    x = DeviceArray((4, 3), np.float32)
    V.check_like_x(DeviceArray((4, 3), np.float32), "dy", x)
    with pytest.raises(ValueError, match=r"dy must have x's shape \(4, 3\), got \(3, 4\)"):
        V.check_like_x(DeviceArray((3, 4), np.float32), "dy", x)
    with pytest.raises(TypeError, match="dy is float64 but x is float32"):
        V.check_like_x(DeviceArray((4, 3), np.float64), "dy", x)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\) = \(3,\)"):
        V.check_channel_shape(DeviceArray((4,), np.float32), "bias", 3)
    with pytest.raises(TypeError, match="running_var is float64 but x is float32"):
        V.check_running_stat(DeviceArray((3,), np.float64), "running_var", 3,
                             np.dtype(np.float32))
    with pytest.raises(TypeError, match=r"out must have x's dtype float32, got float64; "
                                        r"allocate it with cupy.empty_like\(x\)"):
        V.check_out(DeviceArray((4, 3), np.float64), "out", (4, 3), np.dtype(np.float32),
                    xp="cupy")


def test_scalar_and_axis_checks_give_one_exception_type_per_mistake():
    assert V.channel_axis(-1, 4) == 3
    with pytest.raises(TypeError):
        V.channel_axis(1.0, 4)
    with pytest.raises(ValueError):
        V.channel_axis(4, 4)
    with pytest.raises(TypeError):
        V.real("1e-5", "eps", 0.0, np.inf)
    for bad in (-1.0, float("nan"), 10 ** 400):
        with pytest.raises(ValueError):
            V.real(bad, "eps", 0.0, np.inf)
    assert V.check_trainable((4, 3, 2), 1) == 8
    with pytest.raises(ValueError):
        V.check_trainable((1, 3), 1)


def test_check_disjoint_takes_the_backends_overlap_test():
    a, b = DeviceArray((3,), np.float32), DeviceArray((3,), np.float32)
    V.check_disjoint([("out", a)], [("weight", b)], overlap=lambda p, q: False)
    with pytest.raises(ValueError, match="out and weight share memory"):
        V.check_disjoint([("out", a)], [("weight", b)], overlap=lambda p, q: True)
