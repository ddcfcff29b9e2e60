"""Placeholder: being written (see the open issue)."""
from bnfast.errors import UsageError

HELP = "(not written yet)"


def add_arguments(parser):
    pass


def run(args):
    raise UsageError("this command is not written yet")
