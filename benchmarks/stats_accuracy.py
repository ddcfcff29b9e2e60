"""How exact bnfast's float64 batch statistics are on many rows.

    python benchmarks/stats_accuracy.py [--batches 60] [--seed 123]

Random channels-last (BN1d) float64 batches of 5,000-90,000 rows and 3
channels, offsets 0 to 1e5, standard deviations 0.1-10, with row 0 moved up to
five standard deviations off (the case that once cost digits: the sums were
shifted by row 0). Reported: the worst relative error of the training
forward's invstd, in units of float64's eps, against the statistics in long
double, and the same for the float64 reference implementation
(bnfast._reference: numpy's pairwise sums) for scale.
"""
import argparse

import numpy as np

import bnfast
from bnfast import _reference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    eps = np.finfo(np.float64).eps
    worst = np.zeros(2)
    for _ in range(args.batches):
        rows, offset = int(rng.integers(5000, 90000)), float(rng.choice([0, 10, 1e3, 1e5]))
        x = offset + rng.uniform(0.1, 10) * rng.standard_normal((rows, 3))
        x[0] += rng.uniform(-5, 5, 3) * x[1:].std(axis=0)
        exact = x.astype(np.longdouble)
        var = ((exact - exact.mean(axis=0)) ** 2).mean(axis=0)
        exact_invstd = 1 / np.sqrt(var + np.longdouble(1e-5))
        _, _, invstd = bnfast.batch_norm_train(x)
        _, _, reference_invstd, _, _ = _reference.train(x, axis=1)
        for i, got in enumerate((invstd, reference_invstd)):
            worst[i] = max(worst[i], float(np.max(np.abs(got - exact_invstd) / exact_invstd)))
    print(f"worst float64 invstd error over {args.batches} batches, against long double: "
          f"bnfast {worst[0] / eps:.1f} eps, the numpy reference {worst[1] / eps:.1f} eps")


if __name__ == "__main__":
    main()
