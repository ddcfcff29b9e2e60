"""The `bnfast` command line (also `python -m bnfast`).

Subcommands live in bnfast/commands/. Every command exits 0 on success, 1 when
a requested check failed, 2 on bad input, with a one-line message on stderr and
no traceback for the last two.
"""
import argparse
import importlib
import sys

from bnfast import __version__
from bnfast.errors import CheckFailed, UsageError

COMMANDS = ("demo", "export", "fold", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="bnfast", description="Fast Batch Normalization for the CPU.")
    parser.add_argument("--version", action="version", version=f"bnfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"bnfast.commands.{name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except UsageError as err:
        print(f"bnfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"bnfast {args.command}: check failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bnfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
