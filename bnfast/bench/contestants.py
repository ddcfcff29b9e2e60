"""What is timed: each library's calls for one case, as {(workload, outputs): callable}.

  bnfast       the public functions, with out= (preallocated) and without (fresh)
  torch        on tensors sharing the numpy memory: aten.native_batch_norm.out and
               native_batch_norm_backward.out preallocated; F.batch_norm, or
               aten.native_batch_norm + native_batch_norm_backward where the
               saved statistics are needed, fresh
  onnxruntime  BatchNormalization, inference only: a one-node model run through
               io_binding on numpy memory (preallocated) or session.run (fresh);
               ORT takes NCHW only, so channels-last runs on an NCHW copy of x
  numpy        the textbook expression, fresh outputs only

A peer times only what it does like for like: where this torch has no
native_batch_norm_backward.out, its preallocated backward is left out rather
than timed with fresh outputs. Every library runs on the same thread count
(`same_threads`; ORT through its session options). Preallocated outputs start
on a 64-byte line, where torch's allocator starts its tensors and where the
floor's copies write (bnfast.bench.floor says why).
"""
import contextlib
import importlib

import numpy as np

import bnfast
from bnfast.bench import floor
from bnfast.bench.cases import EPS, FRESH, MOMENTUM, PRE, channel_broadcast

PEER_MODULES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx")}


def bnfast_train_step(t, y=None, dx=None):
    """One training step on case tensors t: the forward into y, then the
    backward into dx (fresh outputs where None; dx may be y). Returns dx."""
    _, mean, invstd = bnfast.batch_norm_train(t.x, t.weight, t.bias, running_mean=t.running_mean,
                                              running_var=t.running_var, out=y)
    return bnfast.batch_norm_backward(t.dy, t.x, t.weight, mean, invstd, out=dx)


def bnfast_calls(t):
    y, dx = floor.empty_on_line(t.x), floor.empty_on_line(t.x)   # where torch's would start
    stats = dict(running_mean=t.running_mean, running_var=t.running_var)
    return {
        ("forward", PRE): lambda: bnfast.batch_norm_train(t.x, t.weight, t.bias, **stats, out=y),
        ("forward", FRESH): lambda: bnfast.batch_norm_train(t.x, t.weight, t.bias, **stats),
        ("backward", PRE): lambda: bnfast.batch_norm_backward(
            t.dy, t.x, t.weight, t.save_mean, t.save_invstd, out=dx),
        ("backward", FRESH): lambda: bnfast.batch_norm_backward(
            t.dy, t.x, t.weight, t.save_mean, t.save_invstd),
        ("forward+backward", PRE): lambda: bnfast_train_step(t, y, dx),
        ("forward+backward", FRESH): lambda: bnfast_train_step(t),
        ("inference", PRE): lambda: bnfast.batch_norm_infer(
            t.x, t.weight, t.bias, t.running_mean, t.running_var, out=y),
        ("inference", FRESH): lambda: bnfast.batch_norm_infer(
            t.x, t.weight, t.bias, t.running_mean, t.running_var),
    }


def torch_view(torch, a):
    """A torch tensor over `a`'s memory, strides and all (no copy)."""
    t = torch.from_numpy(a)
    if t.data_ptr() != a.__array_interface__["data"][0]:
        raise RuntimeError("torch.from_numpy copied the array; the comparison would not "
                           "be on the same memory")
    return t


def torch_has_backward_out(torch):
    return "out" in torch.ops.aten.native_batch_norm_backward.overloads()


def torch_calls(mods, t, threads):
    torch = mods["torch"]
    aten, F = torch.ops.aten, torch.nn.functional
    x, dy = torch_view(torch, t.x), torch_view(torch, t.dy)
    w, b, rm, rv = (torch.from_numpy(a.copy()) for a in
                    (t.weight, t.bias, t.running_mean, t.running_var))
    mean, invstd = torch.from_numpy(t.save_mean), torch.from_numpy(t.save_invstd)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    saved = [torch.empty_like(w) for _ in range(4)]   # forward's and inference's save_*
    dw, db = torch.empty_like(w), torch.empty_like(w)
    mask = [True, True, True]

    def forward_out():
        return aten.native_batch_norm.out(x, w, b, rm, rv, True, MOMENTUM, EPS, out=y,
                                          save_mean=saved[0], save_invstd=saved[1])

    def backward_out(mean, invstd):
        return aten.native_batch_norm_backward.out(dy, x, w, None, None, mean, invstd, True,
                                                   EPS, mask, out0=dx, out1=dw, out2=db)

    def forward():
        return aten.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)

    def backward(mean, invstd):
        return aten.native_batch_norm_backward(dy, x, w, None, None, mean, invstd, True,
                                               EPS, mask)

    def train_step_out():
        _, m, s = forward_out()
        return backward_out(m, s)

    def train_step():
        _, m, s = forward()
        return backward(m, s)

    calls = {
        ("forward", PRE): forward_out,
        ("forward", FRESH): lambda: F.batch_norm(x, rm, rv, w, b, training=True,
                                                 momentum=MOMENTUM, eps=EPS),
        ("backward", PRE): lambda: backward_out(mean, invstd),
        ("backward", FRESH): lambda: backward(mean, invstd),
        ("forward+backward", PRE): train_step_out,
        ("forward+backward", FRESH): train_step,
        ("inference", PRE): lambda: aten.native_batch_norm.out(
            x, w, b, rm, rv, False, MOMENTUM, EPS, out=y,
            save_mean=saved[2], save_invstd=saved[3]),
        ("inference", FRESH): lambda: F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS),
    }
    if not torch_has_backward_out(torch):
        del calls[("backward", PRE)], calls[("forward+backward", PRE)]
    return calls


def onnx_bn_model(onnx, t):
    """A one-node BatchNormalization model (opset 15) for x's shape and dtype,
    the parameters as initializers."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    elem = helper.np_dtype_to_tensor_dtype(t.x.dtype)
    params = {"scale": t.weight, "B": t.bias, "mean": t.running_mean, "var": t.running_var}
    node = helper.make_node("BatchNormalization", ["X", *params], ["Y"], epsilon=EPS)
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info("X", elem, list(t.x.shape))],
        [helper.make_tensor_value_info("Y", elem, list(t.x.shape))],
        [numpy_helper.from_array(a, name) for name, a in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def onnxruntime_calls(mods, t, threads):
    ort = mods["onnxruntime"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bn_model(mods["onnx"], t).SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(t.x)    # ORT takes NCHW only: channels-last runs on an NCHW copy
    y = floor.empty_on_line(x)
    binding = session.io_binding()
    binding.bind_input("X", "cpu", 0, x.dtype, x.shape, x.ctypes.data)
    binding.bind_output("Y", "cpu", 0, y.dtype, y.shape, y.ctypes.data)

    def run_bound(keep=(x, y)):      # keep the bound buffers alive with the call
        session.run_with_iobinding(binding)

    return {("inference", PRE): run_bound,
            ("inference", FRESH): lambda: session.run(None, {"X": x})}


def numpy_calls(t):
    """The textbook expressions (fresh outputs only)."""
    x, dy = t.x, t.dy
    axes = tuple(i for i in range(x.ndim) if i != 1)
    m = x.size // x.shape[1]
    w, b = channel_broadcast(t.weight, x.ndim), channel_broadcast(t.bias, x.ndim)
    rm, rv = t.running_mean.copy(), t.running_var.copy()

    def forward():
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        invstd = 1 / np.sqrt(var + EPS)
        rm[:] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
        rv[:] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * m / (m - 1)
        return (x - mean) * invstd * w + b, mean, invstd

    def backward(mean, invstd):
        xhat = (x - mean) * invstd
        dbias = dy.sum(axis=axes, keepdims=True)
        dweight = (dy * xhat).sum(axis=axes, keepdims=True)
        return w * invstd * (dy - dbias / m - xhat * dweight / m), dweight, dbias

    def train_step():
        _, mean, invstd = forward()
        return backward(mean, invstd)

    mean = channel_broadcast(t.save_mean, x.ndim)
    invstd = channel_broadcast(t.save_invstd, x.ndim)
    return {
        ("forward", FRESH): forward,
        ("backward", FRESH): lambda: backward(mean, invstd),
        ("forward+backward", FRESH): train_step,
        ("inference", FRESH): lambda: (x - channel_broadcast(rm, x.ndim))
        / np.sqrt(channel_broadcast(rv, x.ndim) + EPS) * w + b,
    }


PEER_CALLS = {"torch": torch_calls, "onnxruntime": onnxruntime_calls}


def import_peer(name):
    """The modules peer `name` needs, by name; ImportError if one is missing."""
    return {module: importlib.import_module(module) for module in PEER_MODULES[name]}


def find_peers(names):
    """(available {name: modules}, absent {name: reason}) for the peers `names`."""
    available, absent = {}, {}
    for name in names:
        try:
            available[name] = import_peer(name)
        except ImportError as err:
            absent[name] = f"not installed ({err})"
    return available, absent


@contextlib.contextmanager
def same_threads(n, torch=None):
    """bnfast (and torch, when given) on `n` threads inside the block; each
    library's setting as it was after it. bnfast goes back to following OpenMP
    (set_num_threads(None)) when its count before was OpenMP's default."""
    before = bnfast.get_num_threads()
    bnfast.set_num_threads(None)
    default = bnfast.get_num_threads()
    torch_before = torch.get_num_threads() if torch is not None else None
    try:
        bnfast.set_num_threads(n)
        if torch is not None:
            torch.set_num_threads(n)
        yield
    finally:
        bnfast.set_num_threads(None if before == default else before)
        if torch is not None:
            torch.set_num_threads(torch_before)


def notes(peers):
    """One line per library on how it is called."""
    lines = ["bnfast and numpy take numpy arrays; torch runs on tensors sharing their memory."]
    if "torch" in peers:
        has_out = torch_has_backward_out(peers["torch"]["torch"])
        lines.append(
            "torch preallocated: aten.native_batch_norm.out and "
            + ("native_batch_norm_backward.out" if has_out else
               "no preallocated backward (this torch has no native_batch_norm_backward.out)")
            + "; fresh: F.batch_norm for forward and inference, aten.native_batch_norm "
              "+ native_batch_norm_backward for backward and forward+backward.")
    if "onnxruntime" in peers:
        lines.append("onnxruntime: BatchNormalization (opset 15), inference only; "
                     "preallocated through io_binding on numpy memory, fresh through "
                     "session.run. ORT takes NCHW only: its channels-last figures run on "
                     "an NCHW-contiguous copy of x (the same bytes).")
    lines.append("numpy: the textbook expression, fresh outputs only, single-threaded.")
    return lines
