"""bnfast's performance targets, as data (bnfast.bench.targets applies them).

A ratio is median time / copy floor, the floor being the fastest copy of the
same tensor timed in the same run (bnfast.bench.floor). Each rule set applies
to bnfast's figure on every dtype and layout; a (workload, outputs) a set does
not list has no target there. Edit the numbers here, not in the code.

TARGETS are the CPU run's; GPU_TARGETS those of the GPU run (bnfast.bench.gpu),
in the same form, with the rule sets a GPU has.
"""
MB = 1_000_000

TARGETS = {
    # Tiny tensors: what a call costs beyond its work, in microseconds per call.
    "call overhead": {
        "rule": "a call on a (2, 4, 1, 1) tensor, preallocated or fresh, takes at most "
                "3 us for inference and 5 us for training forward",
        "shape": (2, 4, 1, 1),
        "microseconds": {"inference": 3.0, "forward": 5.0},
    },
    # Tensors that fit in L2/L3: the floor is cache bandwidth, and BN needs two
    # passes over cached data (three for backward).
    "in cache": {
        "rule": "tensors under 25 MB: inference 1.6x (either outputs), training forward "
                "3x with out=, backward 4x with out=, forward+backward 6x with out=",
        "below_bytes": 25 * MB,
        "ratio": {
            ("inference", "preallocated"): 1.6,
            ("inference", "fresh"): 1.6,
            ("forward", "preallocated"): 3.0,
            ("backward", "preallocated"): 4.0,
            ("forward+backward", "preallocated"): 6.0,
        },
    },
    # Tensors streamed from memory: one read and one write is the floor.
    "streaming": {
        "rule": "tensors of 25 MB and more: inference 1.1x with out= and 1.6x fresh, "
                "training forward 1.6x with out=, backward 2.7x with out=, times 2.5/1.6 "
                "for (32, 2048, 7, 7) (49-element channel slices); forward+backward with "
                "fresh outputs 5x on every shape",
        "ratio": {
            ("inference", "preallocated"): 1.1,
            ("inference", "fresh"): 1.6,
            ("forward", "preallocated"): 1.6,
            ("backward", "preallocated"): 2.7,
            ("forward+backward", "fresh"): 5.0,
        },
        "shape_factor": {(32, 2048, 7, 7): 2.5 / 1.6},
        "same_on_every_shape": (("forward+backward", "fresh"),),
    },
    # Like for like (preallocated against torch's .out, fresh against fresh),
    # bnfast's median is at most each of these peers' on every row both ran.
    "never slower than": ("torch",),
}


GPU_TARGETS = {
    # On a GPU every tensor streams from HBM (the standard shapes are far larger
    # than L2): the floor is a device-to-device copy of the same tensor.
    "streaming": {
        "rule": "every shape and layout, against a device-to-device copy of x: inference "
                "1.2x, training forward 1.6x, backward 2.7x, forward+backward 5x (fresh "
                "outputs)",
        "ratio": {
            ("inference", "fresh"): 1.2,
            ("forward", "fresh"): 1.6,
            ("backward", "fresh"): 2.7,
            ("forward+backward", "fresh"): 5.0,
        },
        "shape_factor": {},
        "same_on_every_shape": (),
    },
    # Faster than PyTorch's CUDA BatchNorm (cuDNN or its own kernels) on every row.
    "never slower than": ("torch",),
}
