"""Minimal neural-network layers on numpy, enough to train and export BN networks.

Conv → BN → ReLU → pool blocks, then Linear → BN → Linear, as the BatchNorm
literature builds them::

    from bnfast import nn
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.GlobalAvgPool2d(), nn.Flatten(),
        nn.Linear(16, 10), input_shape=(1, 8, 8))
    opt = nn.SGD(net, lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, dlogits = nn.softmax_cross_entropy(net(x), labels)
    net.backward(dlogits)
    opt.step()
    net.save("net.npz"); net = nn.load("net.npz")

``BatchNorm1d``/``2d``/``3d`` are ``bnfast.BatchNorm1d/2d/3d`` (the same classes),
so training runs bnfast's kernels.
"""
from bnfast.nn.modules import (LAYER_TYPES, BatchNorm1d, BatchNorm2d, BatchNorm3d, Conv2d,
                               Flatten, GlobalAvgPool2d, Linear, MaxPool2d, Module, ReLU,
                               Sequential, load, save)
from bnfast.nn.optim import SGD, softmax_cross_entropy
from bnfast.nn.serialize import LoadError

__all__ = [
    "Module", "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU",
    "MaxPool2d",
    "GlobalAvgPool2d", "Flatten", "Sequential", "softmax_cross_entropy", "SGD",
    "save", "load", "LoadError",
]
