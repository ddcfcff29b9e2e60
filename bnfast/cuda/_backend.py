"""Which backend an array belongs to, without importing CuPy.

bnfast.functional dispatches on the array type: these checks are all it
needs, and they must cost nothing (and import nothing) on the numpy path. Its
functions test ``"cupy" in sys.modules`` first and call ``uses_gpu`` only
then: until something imports CuPy, no argument can be a CuPy array.
"""
import sys


def is_cupy_array(a):
    """True if `a` is a cupy.ndarray. Never imports CuPy: if nobody has
    imported it, no argument can be one of its arrays."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def _where(a):
    if is_cupy_array(a):
        return "a cupy.ndarray (GPU)"
    kind = type(a)
    package = kind.__module__.split(".")[0]
    return f"{kind.__name__ if package == 'builtins' else f'{package}.{kind.__name__}'} (CPU)"


def check_same_backend(**arrays):
    """TypeError if the arrays given (by name; None is skipped) mix cupy.ndarray
    with anything else (numpy arrays, lists, CPU tensors)."""
    if "cupy" not in sys.modules:   # the numpy path's fast exit: no CuPy array exists
        return
    given = {name: a for name, a in arrays.items() if a is not None}
    on_gpu = [name for name, a in given.items() if is_cupy_array(a)]
    if not on_gpu or len(on_gpu) == len(given):
        return
    gpu_name = on_gpu[0]
    cpu_name = next(name for name in given if name not in on_gpu)
    raise TypeError(f"{gpu_name} is {_where(given[gpu_name])} but {cpu_name} is "
                    f"{_where(given[cpu_name])}; pass every array on the same device: "
                    f"cupy.asarray({cpu_name}) moves {cpu_name} to the GPU, "
                    f"{gpu_name}.get() brings {gpu_name} to the CPU")


def uses_gpu(**arrays):
    """True if the arrays given (by name; None is skipped) are CuPy arrays, False if
    none is; TypeError naming two of them if they mix CuPy and anything else.
    (A plain loop: numpy calls in a process that has imported CuPy pay for it.)"""
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return False
    kind = cupy.ndarray
    given = on_gpu = 0
    for a in arrays.values():
        if a is not None:
            given += 1
            on_gpu += isinstance(a, kind)
    if on_gpu == 0:
        return False
    if on_gpu < given:
        check_same_backend(**arrays)   # raises, naming a GPU and a CPU argument
    return True
