"""`fq-tune`: MetaSchedule tuning of a model's CPU graph ops, and a search of our int8 kernels'
knobs, into a database for `fq-compile --tuning-db` (see fq_tvm/tuning.py, fq_tvm/kernel_tuning.py)."""

from __future__ import annotations

import argparse
import sys

from .cli import EXIT_STATUS, Parser, _cli

EPILOG = """\
examples:
  fq-tune model.onnx --target host --scheme fq2 --calib calib.npz --input-shape batch=1 \\
      --input-shape seq=128 --trials 32 --budget 20m -o model.tuning
  fq-compile model.onnx --target host --scheme fq2 --calib calib.npz --input-shape batch=1 \\
      --input-shape seq=128 --tuning-db model.tuning -o model.host

Tuned: the knobs of our int8 dequant-matmul kernels (cache blocks, task rows, unrolling, the
row count from which the many-row path runs), measured at 1, 16 and 128 rows: these need no
pins; and the functions the CPU fallback schedules (attention batch-matmuls, softmax, layer
norm, elementwise) whose shapes are static: pin dynamic dims with --input-shape (the same pins
for fq-compile). A build uses a tuned choice only where it beat the hand schedule here. The
output directory holds MetaSchedule's JSON database and fq_tuning.json (target, versions,
hand-schedule latency per task, the kernels' measured knobs); a second run with the same -o
continues it (--trials counts the total per task and kernel). Keep one directory per target.
Seeds are fixed (--seed); the knob search has no randomness.
""" + EXIT_STATUS


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fq-tune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
               description="Tune a model's CPU build: our int8 kernels' knobs, and its graph ops with MetaSchedule.")
    p.add_argument("model", help="the .onnx file (as given to fq-compile)")
    p.add_argument("-t", "--target", default="host", help="target preset or TVM target JSON (default: host)")
    p.add_argument("-o", "--output", default="tuning", help="database directory (default: ./tuning)")
    p.add_argument("--scheme", default="fp32", help="weight scheme, as for fq-compile (default fp32)")
    p.add_argument("--calib", help=".npz of sample inputs (schemes that calibrate)")
    p.add_argument("--calib-samples", type=int, metavar="N", help="calibrate on the first N samples")
    p.add_argument("--redundancy", type=float, help="frame redundancy r for fq schemes")
    p.add_argument("--l-den", type=int, help="frame block size parameter l")
    p.add_argument("--skip", metavar="REGEX", help="layers kept fp32, as for fq-compile")
    p.add_argument("--quantize-head", action="store_true", help="a tied head quantized too, as for fq-compile")
    p.add_argument("--head-scheme", metavar="SCHEME", help="the tied head's scheme, as for fq-compile (e.g. int8)")
    p.add_argument("--act-bits", type=int, choices=(8, 32), default=8, help="as for fq-compile (default 8)")
    p.add_argument("--input-shape", action="append", metavar="NAME=DIMS",
                   help="pin a dynamic input or dim (batch=1); functions with symbolic shapes are not tuned")
    p.add_argument("--trials", type=int, default=32, metavar="N",
                   help="measured candidates per task, in total over runs (default 32)")
    p.add_argument("--budget", metavar="TIME", help="stop after this long (e.g. 20m, 90s, 1h)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-kernels", action="store_true", help="leave our int8 kernels' knobs at their hand values")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on a board from this TVM tracker (fq-rpc-server on the board), not here")
    p.add_argument("--rpc-key", metavar="KEY", help="the kind of board to request from --rpc-tracker (e.g. rpi5)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


@_cli("fq-tune")
def main(argv=None):
    args = _parser().parse_args(argv)
    from .tuning import tune

    out = tune(args.model, args.target, args.output, scheme=args.scheme, calib=args.calib, trials=args.trials,
               budget=args.budget, seed=args.seed, skip=args.skip, act_bits=args.act_bits,
               input_shapes=args.input_shape, calib_samples=args.calib_samples, redundancy=args.redundancy,
               l_den=args.l_den, quiet=args.quiet, tracker=args.rpc_tracker, key=args.rpc_key,
               kernels=not args.no_kernels, quantize_head=args.quantize_head, head_scheme=args.head_scheme)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
