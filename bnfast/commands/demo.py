"""`bnfast demo`: train a BN network on the bundled digits, export it, run it in onnxruntime.

1. Split the 1,797 bundled 8x8 digits (bnfast.data) into 1,437 training and 360
   test images, with a fixed seed.
2. Train a small CNN with BatchNorm (conv-BN-ReLU blocks, global average
   pooling, Linear-BN-ReLU-Linear) with SGD, then the same network without BN
   (conv and linear biases instead) from the same initial weights, data order
   and schedule, so the difference is BN alone.
3. Plot training loss and test accuracy of both (matplotlib, optional).
4. Export the BN network to ONNX, plain and with BN folded into the convs, run
   both in onnxruntime on the test set and compare with bnfast's own forward.

Everything goes to --out: digits_bn.npz (the trained net, for `bnfast export`),
digits_bn.onnx, digits_bn_folded.onnx, curves.png and metrics.json.
"""
import argparse
import os
import tempfile
import time

from bnfast.errors import CheckFailed, UsageError

HELP = ("train a small CNN with BatchNorm on bundled digits, export it to ONNX, check it "
        "in onnxruntime")

EPOCHS = 15
BATCH = 32
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
N_TEST = 360
OPSET = 17
FILES = ("digits_bn.npz", "digits_bn.onnx", "digits_bn_folded.onnx", "curves.png",
         "metrics.json")


def _int_at_least(minimum):
    """An argparse type: an integer >= minimum, else a one-line argparse error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got "
                                             f"{text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def add_arguments(parser):
    parser.add_argument("--epochs", type=_int_at_least(1), default=EPOCHS,
                        help=f"training epochs for each network (default {EPOCHS})")
    parser.add_argument("--out", default="bnfast-demo", metavar="DIR",
                        help="directory for the trained net, ONNX models, plot and metrics "
                             "(default ./bnfast-demo)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed for the split, initial weights and batch order (default 0)")


def run(args):
    out = _prepare_out(args.out)

    import numpy as np

    from bnfast.data import load_digits

    started = time.perf_counter()
    images, labels = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    x = (images[order] / 16.0).astype(np.float32)[:, None]     # (N, 1, 8, 8)
    y = labels[order]
    x_train, y_train, x_test, y_test = x[N_TEST:], y[N_TEST:], x[:N_TEST], y[:N_TEST]
    mean, std = x_train.mean(), x_train.std()                  # standardise, train stats
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    print(f"bnfast demo: 8x8 handwritten digits, {len(y_train)} training / {len(y_test)} "
          f"test images; {args.epochs} epochs of SGD (batch {BATCH}, lr {LR}, momentum "
          f"{MOMENTUM}, weight decay {WEIGHT_DECAY}, cosine schedule), seed {args.seed}")

    init_seed = int(rng.integers(2 ** 32))
    batch_seed = int(rng.integers(2 ** 32))
    runs = {}
    with _one_thread():
        for name, batch_norm in (("with BN", True), ("without BN", False)):
            net = build_net(batch_norm, np.random.default_rng(init_seed))
            runs[name] = train(net, x_train, y_train, x_test, y_test, args.epochs,
                               np.random.default_rng(batch_seed), desc=f"{name:>10}")

    net = runs["with BN"]["net"].eval()
    try:
        net.save(os.path.join(out, "digits_bn.npz"))
        plot_note = plot_curves(runs, os.path.join(out, "curves.png"))
        onnx_report = check_onnx(net, x_test, y_test, out)
        summary = _summary(runs, onnx_report, args, time.perf_counter() - started)
        _write_json(summary, os.path.join(out, "metrics.json"))
    except OSError as err:      # e.g. the disk filled up; each file is whole or absent
        raise UsageError(f"cannot write to --out {out}: {err.strerror or err}") from None
    _print_summary(summary, out, plot_note)
    return 0


# --------------------------------------------------------------------------
# the network and its training
# --------------------------------------------------------------------------

def build_net(batch_norm, rng):
    """conv-BN-ReLU blocks, global average pooling, Linear-BN-ReLU-Linear, for (N, 1, 8, 8).

    Without BN the convs and the first Linear get biases instead (BN's shift
    makes them redundant). The same rng seed gives the same conv/linear weights.
    """
    from bnfast import nn

    def block(c_in, c_out):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm, rng=rng)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        return layers + [nn.ReLU()]

    head = [nn.Linear(64, 64, bias=not batch_norm, rng=rng)]
    if batch_norm:
        head.append(nn.BatchNorm1d(64))
    head += [nn.ReLU(), nn.Linear(64, 10, rng=rng)]
    return nn.Sequential(*block(1, 16), nn.MaxPool2d(2),            # 16 x 4 x 4
                         *block(16, 32), *block(32, 64),             # 64 x 4 x 4
                         nn.GlobalAvgPool2d(), nn.Flatten(), *head,  # 64 -> 10
                         input_shape=(1, 8, 8))


def train(net, x_train, y_train, x_test, y_test, epochs, rng, desc):
    """SGD with a cosine learning-rate schedule; returns the net and its history.

    Batches are drawn without replacement; the last partial batch of an epoch
    is dropped (BN needs more than one sample). Test accuracy after each epoch.
    """
    import numpy as np
    from tqdm import tqdm

    from bnfast import nn

    opt = nn.SGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(y_train) // BATCH
    total = epochs * steps_per_epoch
    history = {"step_loss": [], "epoch_loss": [], "test_accuracy": []}
    started = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="step", leave=True) as bar:
        for epoch in range(epochs):
            net.train()
            order = rng.permutation(len(y_train))
            losses = []
            for step in range(steps_per_epoch):
                t = epoch * steps_per_epoch + step
                opt.lr = LR * 0.5 * (1 + np.cos(np.pi * t / total))
                batch = order[step * BATCH:(step + 1) * BATCH]
                loss, dlogits = nn.softmax_cross_entropy(net(x_train[batch]), y_train[batch])
                net.backward(dlogits)
                opt.step()
                losses.append(loss)
                bar.update()
            accuracy = evaluate(net, x_test, y_test)
            history["step_loss"] += losses
            history["epoch_loss"].append(float(np.mean(losses)))
            history["test_accuracy"].append(accuracy)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", test_acc=f"{100 * accuracy:.1f}%")
    history["seconds"] = time.perf_counter() - started
    history["net"] = net
    return history


def evaluate(net, x, y):
    """Fraction of correct predictions in eval mode (the net is left in eval mode)."""
    return float((net.eval()(x).argmax(axis=1) == y).mean())


# --------------------------------------------------------------------------
# plot, ONNX, report
# --------------------------------------------------------------------------

def plot_curves(runs, path):
    """Training loss per step and test accuracy per epoch, both networks; a PNG.

    Returns None, or a note saying why there is no plot (matplotlib missing).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, so there is no curves.png "
                "(pip install 'bnfast[demo]' to get it)")
    from bnfast._files import atomic_output

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        steps_per_epoch = len(run["step_loss"]) // len(run["epoch_loss"])
        ax_loss.plot([s / steps_per_epoch for s in range(len(run["step_loss"]))],
                     run["step_loss"], color=color, lw=0.6, alpha=0.8, label=name)
        epochs = range(1, len(run["test_accuracy"]) + 1)
        ax_acc.plot(epochs, [100 * a for a in run["test_accuracy"]], "o-", color=color,
                    label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (per batch)", yscale="log",
                title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (360 images)")
    ax_acc.set_ylim(max(0, min(ax_acc.get_ylim()[0], 90)), 100)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("bnfast demo: the same CNN with and without BatchNorm, 8x8 digits")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return None


def check_onnx(net, x_test, y_test, out):
    """Export `net` plain and with BN folded into `out`, run both in onnxruntime on
    x_test (N, 1, 8, 8) float32, and compare the logits with bnfast's forward.

    Returns the "onnx" part of metrics.json (file, size, nodes, accuracy, max
    differences per model); raises CheckFailed when a model's logits differ from
    bnfast's above the "export" tolerance of ``bnfast.onnx.check``.
    """
    from bnfast.onnx import check, export
    from bnfast.onnx.export import INPUT_NAME

    reference = net.eval()(x_test)
    report = {"opset": OPSET, "bnfast_accuracy": float((reference.argmax(1) == y_test).mean())}
    for key, fold, filename in (("plain", False, "digits_bn.onnx"),
                                ("folded", True, "digits_bn_folded.onnx")):
        path = os.path.join(out, filename)
        model = export(net, path, input_shape=(1, 1, 8, 8), opset=OPSET, fold=fold)
        # 360 small images: one thread is plenty
        (logits,) = check.run(path, {INPUT_NAME: x_test}, threads=1).values()
        diff = check.difference(reference, logits, kind="export")
        max_abs, max_rel = diff["max_abs_diff"], diff["max_rel_diff"]
        if not diff["passed"]:
            raise CheckFailed(f"{filename}: onnxruntime's logits differ from bnfast's by "
                              f"{max_abs:.3g} (tolerance {diff['allowed']:.3g})")
        ops = [node.op_type for node in model.graph.node]
        report[key] = {
            "file": filename, "bytes": os.path.getsize(path), "nodes": len(ops),
            "batchnorm_nodes": ops.count("BatchNormalization"),
            "accuracy": float((logits.argmax(1) == y_test).mean()),
            "same_predictions": int((logits.argmax(1) == reference.argmax(1)).sum()),
            "max_logit_diff": float(max_abs), "max_rel_diff": float(max_rel),
        }
    report["test_images"] = int(len(y_test))
    return report


def _epochs_to(accuracies, target):
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def _summary(runs, onnx_report, args, seconds):
    networks = {}
    for name, run in runs.items():
        networks[name] = {
            "test_accuracy": run["test_accuracy"][-1],
            "first_epoch_loss": run["epoch_loss"][0],
            "final_epoch_loss": run["epoch_loss"][-1],
            "epochs_to_95": _epochs_to(run["test_accuracy"], 0.95),
            "train_seconds": run["seconds"],
            "history": {k: run[k] for k in ("epoch_loss", "test_accuracy", "step_loss")},
        }
    return {"seed": args.seed, "epochs": args.epochs, "batch": BATCH, "lr": LR,
            "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "networks": networks,
            "onnx": onnx_report, "seconds": seconds}


def _write_json(data, path):
    import json

    from bnfast._files import atomic_output
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)


def _print_summary(summary, out, plot_note):
    bn, plain = summary["networks"]["with BN"], summary["networks"]["without BN"]
    onnx = summary["onnx"]

    def pct(a):
        return f"{100 * a:.1f} %"

    def reached(n):
        return "not reached" if n is None else str(n)

    n = onnx["test_images"]
    rows = [
        ("", "with BN", "without BN"),
        ("test accuracy", pct(bn["test_accuracy"]), pct(plain["test_accuracy"])),
        ("training loss, epoch 1", f"{bn['first_epoch_loss']:.3f}",
         f"{plain['first_epoch_loss']:.3f}"),
        (f"training loss, epoch {summary['epochs']}", f"{bn['final_epoch_loss']:.4f}",
         f"{plain['final_epoch_loss']:.4f}"),
        ("epochs to 95 % test acc.", reached(bn["epochs_to_95"]),
         reached(plain["epochs_to_95"])),
        ("training time", f"{bn['train_seconds']:.1f} s", f"{plain['train_seconds']:.1f} s"),
        None,
        (f"ONNX (opset {onnx['opset']}), onnxruntime", "plain", "BN folded"),
        ("nodes (BatchNormalization)",
         f"{onnx['plain']['nodes']} ({onnx['plain']['batchnorm_nodes']})",
         f"{onnx['folded']['nodes']} ({onnx['folded']['batchnorm_nodes']})"),
        ("model size", f"{onnx['plain']['bytes'] / 1024:.1f} KiB",
         f"{onnx['folded']['bytes'] / 1024:.1f} KiB"),
        ("test accuracy", pct(onnx["plain"]["accuracy"]), pct(onnx["folded"]["accuracy"])),
        ("predictions == bnfast's", f"{onnx['plain']['same_predictions']}/{n}",
         f"{onnx['folded']['same_predictions']}/{n}"),
        ("max |logit diff| vs bnfast", f"{onnx['plain']['max_logit_diff']:.1e}",
         f"{onnx['folded']['max_logit_diff']:.1e}"),
    ]
    print()
    for row in rows:
        print("" if row is None else f"  {row[0]:<30}{row[1]:>12}  {row[2]:>12}")
    print()
    if plot_note:
        print(f"note: {plot_note}")
    written = [f for f in FILES if os.path.exists(os.path.join(out, f))]
    print(f"wrote {', '.join(written)} to {out}/ in {summary['seconds']:.1f} s")


def _one_thread():
    """Limit BLAS and OpenMP to one thread while training (threadpoolctl, if installed).

    Every tensor here is small: a thread team costs more than it saves, and when
    the cores are busy, waiting threads slow each step down many times over.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _prepare_out(path):
    """Create the output directory and make sure it is writable, before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to --out {path}: {err.strerror or err}") from None
    return path
