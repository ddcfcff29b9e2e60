"""mpi4py, imported only when synchronized BN is used, and the communicator check."""

INSTALL_HINT = ("pip install 'bnfast[mpi]' (mpi4py and the mpich wheel; no system MPI "
                "needed)")


def mpi():
    """The ``mpi4py.MPI`` module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(f"bnfast.distributed needs mpi4py and an MPI library, and "
                          f"importing mpi4py.MPI failed ({err}); {INSTALL_HINT}") from err
    except RuntimeError as err:   # mpi4py is there but found no MPI library to load
        raise ImportError(f"mpi4py is installed but cannot load an MPI library ({err}); "
                          f"{INSTALL_HINT}") from err
    return MPI


def resolve_comm(comm):
    """``comm`` checked to be a usable mpi4py intracommunicator; None means COMM_WORLD."""
    MPI = mpi()
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator such as MPI.COMM_WORLD, got "
                        f"{type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm is MPI.COMM_NULL, which holds no processes; pass "
                         "MPI.COMM_WORLD or a communicator this process belongs to")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an intracommunicator (MPI.COMM_WORLD, or one made "
                        f"with comm.Split), got {type(comm).__name__}")
    return comm
