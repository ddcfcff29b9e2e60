"""The loss and the optimizer: softmax cross-entropy and SGD with momentum."""
import numpy as np


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits : (N, K) float; labels : (N,) integers in [0, K).
    Returns ``loss`` (a Python float) and ``dlogits`` ((N, K), logits' dtype):
    dloss/dlogits = (softmax(logits) - onehot(labels)) / N.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.dtype.kind != "f":
        raise ValueError(f"logits must be a float array of shape (N, K), got "
                         f"{logits.dtype} {logits.shape}")
    N, K = logits.shape
    if labels.shape != (N,) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers of shape ({N},), got {labels.dtype} "
                         f"{labels.shape}")
    if N and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}), got values from {labels.min()} "
                         f"to {labels.max()}")
    if N == 0:
        raise ValueError("softmax_cross_entropy needs at least one sample")
    # log-softmax, shifted by the row maximum so exp never overflows
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(N)
    loss = -log_prob[rows, labels].mean()
    dlogits = np.exp(log_prob)
    dlogits[rows, labels] -= 1.0
    return float(loss), (dlogits / N).astype(logits.dtype)


class SGD:
    """Stochastic gradient descent with momentum and weight decay (PyTorch's rule).

    For each parameter p with gradient g (from the net's last backward):
    ``g = g + weight_decay * p``; ``v = momentum * v + g``; ``p -= lr * v``.
    Parameters are updated in place. ``lr`` may be changed between steps.
    """

    def __init__(self, net, lr, momentum=0.0, weight_decay=0.0):
        for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0),
                                 ("weight_decay", weight_decay, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not np.isfinite(value) or value < low:
                raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
        self.net = net
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._velocity = [np.zeros_like(p) for p in net.parameters()]

    def step(self):
        """Update every parameter from the gradients of the net's last backward."""
        params = self.net.parameters()
        for p, g, v in zip(params, self.net.grads(), self._velocity, strict=True):
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                v *= self.momentum
                v += g
                g = v
            p -= (self.lr * g).astype(p.dtype, copy=False)
