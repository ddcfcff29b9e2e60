"""Data-parallel training with synchronized BatchNorm over MPI, on the bundled digits.

    mpiexec -n 2 python -m mpi4py examples/data_parallel.py [--epochs 6] [--out DIR]

Trains the demo CNN (``bnfast demo``'s conv-BN-ReLU network) three ways, from
the same initial weights and the same sequence of batches:

1. single process, whole batches of B = P * b images (the reference);
2. P ranks, each on its b images of every batch, BN synchronized
   (``SyncBatchNorm.convert``): the same training as 1, split over processes;
3. P ranks, each on its b images, plain per-rank BN: statistics of b images;
4. as 1 with each batch's images in reverse order: a control that shows how
   far two float32 runs drift apart when only the order of sums differs.

and writes ``data_parallel.png`` (training loss per step, test accuracy per
epoch) and ``data_parallel.json`` to --out. With b small, 2 follows 1 step for
step while 3 trains worse.

The data-parallel step: every rank feeds the gradient of the *global* mean loss
(dlogits divided by the global batch size B), runs backward, then one Allreduce
(sum) adds the conv and linear gradients of all ranks. SyncBatchNorm's
grad_weight and grad_bias are already sums over the global batch, the same on
every rank, so they are not reduced again. Every rank then takes the same SGD
step and the replicas stay identical.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from bnfast import nn
from bnfast.commands.demo import build_net
from bnfast.data import load_digits
from bnfast.distributed import SyncBatchNorm

N_TEST = 360
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    parser.add_argument("--per-rank-batch", type=int, default=4,
                        help="images per rank in each step, b (default 4)")
    parser.add_argument("--out", default="data_parallel_out", metavar="DIR",
                        help="where the plot and the JSON go (default ./data_parallel_out)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def digits(seed):
    """The demo's split and standardisation: (x_train, y_train, x_test, y_test)."""
    images, labels = load_digits()
    order = np.random.default_rng(seed).permutation(len(labels))
    x = (images[order] / 16.0).astype(np.float32)[:, None]
    y = labels[order]
    x_train, y_train, x_test, y_test = x[N_TEST:], y[N_TEST:], x[:N_TEST], y[:N_TEST]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def reduced_grads(net):
    """The gradient arrays each rank holds only a part of: all but SyncBatchNorm's."""
    return [g for layer in net for g in layer.grads() if not isinstance(layer, SyncBatchNorm)]


def allreduce_sum(arrays, comm):
    """Sum each array over the ranks, in place: one Allreduce of one flat buffer."""
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    comm.Allreduce(MPI.IN_PLACE, flat)
    start = 0
    for a in arrays:
        a[...] = flat[start:start + a.size].reshape(a.shape)
        start += a.size


def train(net, data, epochs, global_batch, rng_seed, comm=None, reverse_batches=False):
    """SGD (the demo's cosine schedule) on batches of ``global_batch`` images; with
    ``comm``, each rank trains on its slice of every batch. ``reverse_batches``
    takes each batch's images in reverse order: the same training up to the
    order of floating-point sums. Returns the history (global loss per step,
    test accuracy per epoch, from rank 0's replica)."""
    x_train, y_train, x_test, y_test = data
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    per_rank = global_batch // size
    opt = nn.SGD(net, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(rng_seed)
    steps_per_epoch = len(y_train) // global_batch
    total = epochs * steps_per_epoch
    history = {"step_loss": [], "test_accuracy": []}
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(len(y_train))
        for step in range(steps_per_epoch):
            t = epoch * steps_per_epoch + step
            opt.lr = LR * 0.5 * (1 + np.cos(np.pi * t / total))
            batch = order[step * global_batch:(step + 1) * global_batch]
            if reverse_batches:
                batch = batch[::-1]
            mine = batch[rank * per_rank:(rank + 1) * per_rank]
            loss, dlogits = nn.softmax_cross_entropy(net(x_train[mine]), y_train[mine])
            # the gradient of the global mean loss: divide by B, not by b
            net.backward(dlogits * np.float32(len(mine) / global_batch))
            if comm is not None:
                allreduce_sum(reduced_grads(net), comm)
                loss = comm.allreduce(loss * len(mine)) / global_batch
            opt.step()
            history["step_loss"].append(float(loss))
        # test accuracy of rank 0's replica, in eval mode (no communication)
        accuracy = float((net.eval()(x_test).argmax(axis=1) == y_test).mean())
        history["test_accuracy"].append(accuracy)
        if rank == 0:
            epoch_loss = np.mean(history["step_loss"][-steps_per_epoch:])
            print(f"  epoch {epoch + 1}/{epochs}: loss {epoch_loss:.4f}, "
                  f"test accuracy {100 * accuracy:.1f} %", flush=True)
    if comm is not None:
        history["replicas_identical"] = replicas_identical(net, comm)
    return history


def replicas_identical(net, comm):
    """Whether every rank holds the same parameters, bit for bit (and, with
    SyncBatchNorm, the same running statistics)."""
    synced = any(isinstance(layer, SyncBatchNorm) for layer in net)
    arrays = net.state_dict().values() if synced else net.parameters()
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    return len(set(comm.allgather(digest.hexdigest()))) == 1


def plot(runs, path, per_rank, size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"single": dict(color="black", lw=2.2, alpha=0.45),
              "sync": dict(color="tab:blue", lw=0.9),
              "local": dict(color="tab:red", lw=0.9),
              "reversed": dict(color="tab:green", lw=0.8, ls="--")}
    window = 20
    for key, run in runs.items():
        loss = np.asarray(run["step_loss"])
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(np.arange(window - 1, len(loss)), smooth, label=run["label"], **styles[key])
        epochs = np.arange(1, len(run["test_accuracy"]) + 1)
        ax_acc.plot(epochs, 100 * np.asarray(run["test_accuracy"]), marker="o", ms=4,
                    label=run["label"], **{"ls": "-", **styles[key]})
    ax_loss.set(xlabel="step", ylabel=f"training loss (mean of {window} steps)", yscale="log",
                title="Training loss of the global batch")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy (360 images)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bnfast SyncBatchNorm over MPI: {size} ranks x {per_rank} images vs one "
                 f"process x {size * per_rank}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        print("run this example on 2 or more ranks: mpiexec -n 2 python -m mpi4py "
              "examples/data_parallel.py", file=sys.stderr)
        return 2
    try:   # small tensors: one thread per rank (the ranks share the cores)
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass

    data = digits(args.seed)
    global_batch = size * args.per_rank_batch
    label = f"{size} ranks x {args.per_rank_batch}"
    runs = {}
    if rank == 0:
        print(f"SyncBatchNorm: {label} images per step, BN synchronized")
    net = SyncBatchNorm.convert(build_net(True, np.random.default_rng(args.seed)), comm=comm)
    runs["sync"] = dict(label=f"{label}, SyncBatchNorm",
                        **train(net, data, args.epochs, global_batch, args.seed + 1, comm))
    if rank == 0:
        print(f"plain BN per rank: {label} images per step, statistics of "
              f"{args.per_rank_batch} images")
    net = build_net(True, np.random.default_rng(args.seed))
    runs["local"] = dict(label=f"{label}, per-rank BatchNorm",
                         **train(net, data, args.epochs, global_batch, args.seed + 1, comm))
    if rank == 0:
        print(f"single process: whole batches of {global_batch}")
        net = build_net(True, np.random.default_rng(args.seed))
        runs["single"] = dict(label=f"1 process x {global_batch}, BatchNorm",
                              **train(net, data, args.epochs, global_batch, args.seed + 1))
        print(f"single process, images of each batch in reverse order (rounding control)")
        net = build_net(True, np.random.default_rng(args.seed))
        runs["reversed"] = dict(label=f"1 process x {global_batch}, batches reversed",
                                **train(net, data, args.epochs, global_batch, args.seed + 1,
                                        reverse_batches=True))
        runs = {k: runs[k] for k in ("single", "sync", "local", "reversed")}
        os.makedirs(args.out, exist_ok=True)
        plot(runs, os.path.join(args.out, "data_parallel.png"), args.per_rank_batch, size)
        steps = len(runs["single"]["step_loss"]) // args.epochs
        single = np.asarray(runs["single"]["step_loss"])
        for run in runs.values():
            loss = np.asarray(run["step_loss"])
            run["epoch_loss"] = [float(e) for e in loss.reshape(args.epochs, steps).mean(axis=1)]
            apart = np.flatnonzero(np.abs(loss - single) > 1e-3)
            run["steps_within_1e-3_of_single"] = int(apart[0]) if apart.size else len(loss)
        summary = {"ranks": size, "per_rank_batch": args.per_rank_batch,
                   "global_batch": global_batch, "epochs": args.epochs, "lr": LR,
                   "seed": args.seed, "runs": runs}
        with open(os.path.join(args.out, "data_parallel.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print()
        print(f"  {'':<40}{'test acc.':>10}{'loss, epoch 1':>15}{'last epoch':>12}"
              f"{'steps = single':>16}")
        for run in runs.values():
            print(f"  {run['label']:<40}{100 * run['test_accuracy'][-1]:>8.1f} %"
                  f"{run['epoch_loss'][0]:>15.4f}{run['epoch_loss'][-1]:>12.4f}"
                  f"{run['steps_within_1e-3_of_single']:>16}")
        print("  (steps = single: steps before the loss first differs from the single-process "
              "run by more than 1e-3)")
        for key in ("sync", "local"):
            same = "identical" if runs[key]["replicas_identical"] else "DIFFERENT"
            print(f"  {runs[key]['label']}: the ranks' networks are {same} after training")
        print(f"wrote data_parallel.png and data_parallel.json to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
