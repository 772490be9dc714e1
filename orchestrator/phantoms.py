"""`python -m orchestrator.phantoms OUT [--n N] [--shape D H W] [--seed S] [--variant private|public]`

Writes the built-in cardiac phantom dataset (the generator itself is `trainers/phantoms.py`,
next to the data code that reads it).
"""
from __future__ import annotations

import argparse
import sys

from orchestrator.errors import UserError
from trainers.phantoms import VARIANTS, synthesize


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse prints usage + message; we want one line
        raise UserError(message)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m orchestrator.phantoms",
                 description="Write the built-in cardiac phantom dataset (reference format).")
    ap.add_argument("out", help="data root folder to create")
    ap.add_argument("--n", type=int, default=256, help="number of volumes (>= 6): ceil(n/2) subjects at ED and ES")
    ap.add_argument("--shape", type=int, nargs=3, default=(13, 48, 48), metavar=("D", "H", "W"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=VARIANTS, default="private")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    try:
        args = ap.parse_args(argv)
        r = synthesize(args.out, n=args.n, shape=args.shape, seed=args.seed,
                       variant=args.variant, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    sp = r["splits"]
    print(f"wrote {r['n']} {r['variant']} phantoms {'x'.join(map(str, r['shape']))} (seed {r['seed']}) "
          f"to {r['root']}: training={sp['training']} validation={sp['validation']} testing={sp['testing']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
