"""fq-bench command line (the work is in fq_tvm.benchmark)."""

from __future__ import annotations

import argparse
import sys

from .cli import EXIT_STATUS, Parser, _cli
from .errors import FqError

EPILOG = """\
examples:
  fq-bench model.onnx --calib calib.npz                       # fp32, int8, fq2 here, beside ORT
  fq-bench model.onnx --calib calib.npz --inputs eval.npz --threads 4 -o model.bench
  fq-bench model.onnx --artifacts model.fp32 model.fq2 --inputs eval.npz   # reuse builds
  fq-bench model.onnx --calib calib.npz --target rpi5 --rpc 192.168.1.50:9090
  fq-bench model.onnx --calib calib.npz --target rpi5 --tracker 10.0.0.2:9190 --key rpi5

Eval inputs: --inputs (an .npz keyed by input name), else the first 8 samples of --calib. Every
build runs on them; its outputs are compared with ONNX Runtime fp32 on the same inputs (max
relative error, cosine) and with the fq-tvm fp32 build. Latency: warm-up, then blocks of calls per
runner, interleaved, about --seconds per runner in all: median, p10, p90.

The report directory (default MODEL.bench) gets report.md, report.json, report.png (with
matplotlib) and the built artifacts under artifacts/. It is written to a temporary directory and
renamed when complete: an error leaves nothing behind. --force replaces an earlier report.

Remote boards (TVM RPC): start `fq-rpc-server` on the board (README, "Deploy to a Raspberry Pi").
--rpc talks to one server; --tracker asks a TVM tracker for a free board of kind --key, waiting up
to --timeout seconds. The fq-tvm builds are uploaded and timed on the board (VM time evaluator,
network excluded); ONNX Runtime runs here as the accuracy reference only.
""" + EXIT_STATUS


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fq-bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
               description="Latency, size and accuracy of a model's fq-tvm builds beside ONNX Runtime.")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--calib", help=".npz of calibration samples (needed by fq2 and other GPTQ-based schemes)")
    p.add_argument("--schemes", default="fp32,int8,fq2",
                   help="comma-separated schemes to build (default fp32,int8,fq2)")
    p.add_argument("-t", "--target", help="target preset of the builds (default host; a board's preset with --rpc)")
    p.add_argument("--artifacts", nargs="+", metavar="DIR", help="measure these artifacts instead of building")
    p.add_argument("-i", "--inputs", help=".npz of eval inputs keyed by input name (default: 8 calib samples)")
    p.add_argument("--threads", type=int, help="threads for fq-tvm and ONNX Runtime (default: physical cores)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per build, seconds (default 2)")
    p.add_argument("--no-ort", action="store_true", help="leave out the ONNX Runtime int8 / MatMulNBits rows "
                                                         "(ORT fp32 stays: it is the reference)")
    p.add_argument("-o", "--output", help="report directory (default MODEL.bench beside the model)")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run the builds on the RPC server at HOST:PORT")
    p.add_argument("--tracker", metavar="HOST:PORT", help="TVM RPC tracker to get a board from")
    p.add_argument("--key", help="board kind registered with the tracker (e.g. rpi5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a free board (default 60)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


@_cli("fq-bench")
def main(argv=None):
    args = parser().parse_args(argv)
    from .benchmark import bench

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.seconds <= 0:
        raise FqError(f"--seconds must be positive, not {args.seconds}")
    result = bench(args.model, args.calib, schemes, target=args.target, inputs=args.inputs, threads=args.threads,
                   out_dir=args.output, artifacts=args.artifacts or (), rpc=args.rpc, tracker=args.tracker,
                   key=args.key, seconds=args.seconds, ort=not args.no_ort, force=args.force, quiet=args.quiet,
                   timeout=args.timeout)
    if not args.quiet:
        from .bench_report import markdown

        print(markdown(result), file=sys.stderr)
    print(result["report_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
