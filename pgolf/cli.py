"""`pgolf`: the command line. Thin dispatch; each concern registers its own subcommands.

Each concern's `commands.py` exposes `add_<concern>_commands(subparsers)`, which adds parsers whose
`func(args) -> int` does the work. A UserError is printed as one line and exits with status 2; so is an
OSError that reaches here (a read-only folder, a full disk), naming its path.
"""

import argparse
import importlib
import sys

from pgolf.errors import UserError

# (module, function) pairs, in the order the help lists them.
COMMAND_MODULES = [
    ("pgolf.data.commands", "add_data_commands"),
    ("pgolf.train.commands", "add_train_commands"),
    ("pgolf.quant.commands", "add_quant_commands"),
    ("pgolf.eval.commands", "add_eval_commands"),
    ("pgolf.bench.commands", "add_bench_commands"),
    ("pgolf.experiments.commands", "add_experiments_commands"),
    ("pgolf.export.commands", "add_export_commands"),
    ("pgolf.demo", "add_demo_commands"),
    ("pgolf.recipe_commands", "add_recipes_commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter Golf: train, quantize, evaluate, export.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in COMMAND_MODULES:
        getattr(importlib.import_module(module_name), func_name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"pgolf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"pgolf: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgolf: interrupted", file=sys.stderr)
        return 130
