"""Exceptions the command line turns into exit codes."""


class UsageError(Exception):
    """Bad input from the user (missing or corrupt file, wrong option): exit code 2,
    one line on stderr, no traceback."""


class CheckFailed(Exception):
    """A requested check ran and found a difference above tolerance: exit code 1."""
