"""fq-bundle command line (the work is in fq_tvm.bundler)."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import EXIT_STATUS, Parser, _cli

EPILOG = """\
examples:
  fq-bundle model.rpi5 -o model-rpi5.tar.gz        # aarch64: needs bash scripts/setup_arm64.sh once
  fq-bundle model.host -o model-host.tar.gz        # this machine's architecture

on the board:
  tar xzf model-rpi5.tar.gz && cd model-rpi5
  ./run.sh -i inputs.npz -o outputs --repeat 20    # outputs/NAME.npy, latency on stderr

The tarball holds the artifact (every file its manifest lists), TVM's runtime libraries for the
artifact's architecture (aarch64: from the arm64 sysroot of scripts/setup_arm64.sh; this machine's:
from the installed wheels), a C++ runner compiled for it (aarch64-linux-gnu-g++ / g++), run.sh and
README.txt. The runner verifies the artifact's sha256 checksums before loading it. run.sh refuses,
in one line, a machine of another architecture or with an older glibc / libstdc++ than the
libraries need; fq-bundle prints that requirement. The tarball is written to a temporary file and
renamed when complete; --force replaces an existing file (never a directory).
""" + EXIT_STATUS


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fq-bundle", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
               description="Pack an artifact, TVM's runtime and a C++ runner into a tarball that runs "
                           "the model without Python.")
    p.add_argument("artifact", help="the artifact directory (fq-compile's output), a CPU target")
    p.add_argument("-o", "--output", required=True, help="the tarball to write (.tar.gz or .tgz)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


@_cli("fq-bundle")
def main(argv=None):
    args = parser().parse_args(argv)
    from .bundler import bundle

    summary = bundle(args.artifact, args.output, force=args.force, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    else:
        print(summary["path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
