"""Tests that run on every rank of MPI.COMM_WORLD.

    mpiexec -n 3 python -P -m mpi4py -m pytest -p no:cacheprovider tests/mpi

Each rank runs the same tests in the same order and checks its own results;
``python -m mpi4py`` turns a failing rank's exit status into MPI_Abort, so the
job fails. A test that hangs (a collective some rank never joins) dumps every
thread's stack and ends its rank after HANG_SECONDS, which ends the job. In
the plain test suite (no mpiexec) the same tests run on one rank.

The tests keep the ranks in step: every test runs all of its collectives
before its first assertion, so a failed assertion on one rank never leaves
another waiting in a collective of the next test.
"""
import faulthandler
import os
import sys

import pytest

HANG_SECONDS = float(os.environ.get("BNFAST_MPI_TEST_TIMEOUT", 120))


@pytest.fixture(autouse=True)
def fail_on_hang():
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def pytest_report_header(config):
    try:
        from mpi4py import MPI
    except ImportError:
        return "mpi4py: not installed (the tests in tests/mpi are skipped)"
    comm = MPI.COMM_WORLD
    library = MPI.Get_library_version().splitlines()[0].strip()
    return f"MPI: rank {comm.Get_rank()} of {comm.Get_size()} ({library})"
