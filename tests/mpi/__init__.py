"""Tests run on every rank under mpiexec (see conftest.py); a package, so that its
conftest does not shadow tests/conftest.py."""
