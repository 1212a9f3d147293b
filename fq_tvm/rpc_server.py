"""fq-rpc-server: a TVM RPC server for a board, optionally registered with a tracker.

    fq-rpc-server --tracker 10.0.0.2:9190 --key rpi5       # join a tracker's pool as a 'rpi5'
    fq-rpc-server --port 9090                              # stand-alone: fq-bench --rpc BOARD:9090

Needs only TVM's runtime and numpy on the board (no compiler, no cloudpickle: the server runs in
this process, not in TVM's Popen worker). It also answers `fq_tvm.board_info` (architecture, CPU
model and flags, cores, glibc) so that fq-bench can refuse an artifact the board cannot run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import FqError

EPILOG = """\
examples:
  fq-rpc-server --tracker 10.0.0.2:9190 --key rpi5     # then: fq-bench ... --tracker 10.0.0.2:9190 --key rpi5
  fq-rpc-server --port 9090                            # then: fq-bench ... --rpc BOARD_IP:9090
  fq-rpc-server --tracker 10.0.0.2:9190 --key rpi5 --custom-addr 192.168.1.50   # behind NAT

The server runs whatever library a client uploads: use it on a trusted network only.
"""


def parser() -> argparse.ArgumentParser:
    from .cli import Parser

    p = Parser(prog="fq-rpc-server", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
               description="Serve this board to fq-bench through TVM RPC.")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    p.add_argument("--port-end", type=int, help="last port to try (default: --port + 99)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="register with this TVM RPC tracker")
    p.add_argument("--key", default="", help="board kind in the tracker's pool (e.g. rpi5); needed with --tracker")
    p.add_argument("--custom-addr", help="address the tracker gives clients for this board (default: as seen)")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    return p


def register_board_info() -> None:
    import tvm_ffi

    from .cpuinfo import board_info_json
    from .rpc import BOARD_INFO

    tvm_ffi.register_global_func(BOARD_INFO, board_info_json, override=True)


def start(host: str, port: int, port_end: int, tracker=None, key: str = "", custom_addr=None, quiet=False):
    """Bind and serve in a thread of this process; return TVM's server state (.port, .thread)."""
    from tvm.rpc.server import PopenRPCServerState

    register_board_info()
    return PopenRPCServerState(host, port, port_end + 1, False, tracker, key, None, custom_addr, quiet)


def _serve(args) -> int:
    from .rpc import _tracker_socket, parse_addr

    tracker = None
    if args.tracker:
        if not args.key:
            raise FqError("--tracker needs --key, the kind of this board (e.g. rpi5)")
        tracker = parse_addr(args.tracker, "--tracker")
        _tracker_socket(tracker).close()  # fail now, not after TVM's 60 s of retries
    port_end = args.port + 99 if args.port_end is None else args.port_end
    try:
        state = start(args.host, args.port, port_end, tracker, args.key, args.custom_addr, args.quiet)
    except (OSError, ValueError) as err:
        raise FqError(f"cannot listen on {args.host}, ports {args.port}-{port_end}: {err}") from None
    where = f"tracker {args.tracker} as '{args.key}'" if tracker else "no tracker"
    print(f"fq-rpc-server: serving on {args.host}:{state.port} ({where})", file=sys.stderr, flush=True)
    state.thread.join()
    return 1  # the serving thread ended: TVM logged why


def _interrupt(signum, frame):
    """SIGTERM (kill, systemd stop) ends the server as Ctrl-C does."""
    raise KeyboardInterrupt


def _end_sessions() -> None:
    """Sessions still open end with the server: TVM serves each in a forked process, which would
    outlive it as long as its client stays connected, and in a work directory holding what the
    client uploaded, which TVM removes only when the session ends or at a normal exit."""
    import multiprocessing

    from tvm.support.utils import TempDirectory

    for child in multiprocessing.active_children():
        child.kill()  # (SIGTERM waits: the session's C++ loop does not return to Python)
        child.join()
    TempDirectory.remove_tempdirs()


def main(argv=None):
    from .cli import _cli

    @_cli("fq-rpc-server")
    def run(argv):
        args = parser().parse_args(argv)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return _serve(args)
        except KeyboardInterrupt:
            _end_sessions()
            print("fq-rpc-server: stopped", file=sys.stderr)
            os._exit(130)  # the serving thread does not stop on its own

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
