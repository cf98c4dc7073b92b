"""``python -m benchmarks ...`` from the repository root: see :mod:`benchmarks.cli`."""
import argparse

from .cli import __doc__ as _doc, add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=_doc.split("\n")[0],
                                     epilog="Usage examples: see benchmarks/cli.py.")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
