"""Run artifacts on a remote board through TVM RPC: one server (`rpc="HOST:PORT"`) or a board of
kind `key` from a TVM tracker's pool (`tracker="HOST:PORT"`), waiting up to a timeout for a free
one. The library is uploaded, run by the Relax VM on the board, and timed there by the VM's time
evaluator (one call per repeat, so the network is not in the figures).

Every failure is an FqError with one line: unreachable tracker or server, no free board before the
timeout, a board of another architecture or without a CPU feature the kernels use.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FqError

CONNECT_TIMEOUT = 5.0  # seconds to open a TCP connection to a tracker or server
BOARD_INFO = "fq_tvm.board_info"  # registered by fq-rpc-server; a stock TVM server lacks it


def parse_addr(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FqError(f"{flag} takes HOST:PORT (e.g. 192.168.1.50:9090), not '{text}'")
    return host, int(port)


@dataclass(frozen=True)
class Remote:
    """Where to run: a server address, or a tracker address and a board key."""

    server: tuple[str, int] | None = None
    tracker: tuple[str, int] | None = None
    key: str = ""

    @classmethod
    def parse(cls, rpc: str | None, tracker: str | None, key: str | None) -> "Remote":
        if rpc and tracker:
            raise FqError("give either --rpc HOST:PORT (one server) or --tracker HOST:PORT --key KEY, not both")
        if tracker:
            if not key:
                raise FqError("--tracker needs --key, the kind of board to request (e.g. rpi5)")
            return cls(tracker=parse_addr(tracker, "--tracker"), key=key)
        return cls(server=parse_addr(rpc, "--rpc"), key=key or "")

    def describe(self) -> str:
        if self.tracker:
            return f"tracker {_addr(self.tracker)}, key '{self.key}'"
        return f"RPC server {_addr(self.server)}"


def _addr(addr) -> str:
    return f"{addr[0]}:{addr[1]}"


# ---- reaching the tracker and the servers ------------------------------------------------------

def _connect(addr, what: str) -> socket.socket:
    try:
        return socket.create_connection(addr, timeout=CONNECT_TIMEOUT)
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise FqError(f"cannot reach the {what} at {_addr(addr)} ({reason})") from None


def _tracker_socket(addr) -> socket.socket:
    from tvm.rpc import base

    sock = _connect(addr, "RPC tracker")
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError):
        magic = None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise FqError(f"{_addr(addr)} is not a TVM RPC tracker (wrong handshake)")
    return sock


def check_reachable(remote: Remote) -> None:
    """Fail fast, before any compile, when the tracker or server does not answer."""
    if remote.tracker:
        _tracker_socket(remote.tracker).close()
    else:
        _connect(remote.server, "RPC server").close()


def tracker_summary(addr) -> dict:
    """The tracker's {"queue_info": {key: {"free", "pending"}}, "server_info": [...]}."""
    from tvm.rpc import base

    with contextlib.closing(_tracker_socket(addr)) as sock:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    return value[1]


def request_board(addr, key: str, timeout: float) -> tuple[str, int, str]:
    """(host, port, match key) of a free board of kind `key`, waiting up to `timeout` seconds."""
    from tvm.rpc import base

    with contextlib.closing(_tracker_socket(addr)) as sock:
        sock.settimeout(timeout)
        try:
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
            value = base.recvjson(sock)
        except (OSError, RuntimeError):
            raise FqError(_no_board(addr, key, timeout)) from None
    if value[0] != base.TrackerCode.SUCCESS:
        raise FqError(f"tracker {_addr(addr)} refused the request for '{key}': {value}")
    host, port, matchkey = value[1]
    return host, int(port), matchkey


def _no_board(addr, key: str, timeout: float) -> str:
    try:
        servers = [s for s in tracker_summary(addr)["server_info"] if s.get("key") == f"server:{key}"]
    except (FqError, OSError, RuntimeError, KeyError, TypeError):
        servers = None
    if servers == []:
        return (f"no free board of kind '{key}' within {timeout:g} s: none is registered with tracker "
                f"{_addr(addr)} (start one with: fq-rpc-server --tracker {_addr(addr)} --key {key})")
    return f"no free board of kind '{key}' within {timeout:g} s at tracker {_addr(addr)} (all busy)"


@contextlib.contextmanager
def open_board(remote: Remote, timeout: float = 60.0):
    """A Board session, closed on exit."""
    import tvm.rpc

    if remote.tracker:
        host, port, matchkey = request_board(remote.tracker, remote.key, timeout)
        where = f"{host}:{port} via tracker {_addr(remote.tracker)} (key '{remote.key}')"
    else:
        (host, port), matchkey = remote.server, remote.key
        _connect((host, port), "RPC server").close()
        where = f"{host}:{port}"
    try:
        session = tvm.rpc.connect(host, port, matchkey)
    except Exception as err:
        raise FqError(f"cannot open an RPC session with {where}: {_last_line(err)}") from None
    board = Board(session, where)
    try:
        yield board
    finally:
        board.close()


def _last_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


# ---- a board -------------------------------------------------------------------------------------

class Board:
    """An RPC session with a board: its description, checks, and remote runners for artifacts."""

    def __init__(self, session, where: str):
        self.session = session
        self.where = where
        self.info = self._info()
        self._models = []

    def _info(self) -> dict | None:
        try:
            return json.loads(self.session.get_function(BOARD_INFO)())
        except Exception:  # a stock TVM RPC server: no board description
            return None

    def describe(self) -> str:
        from .cpuinfo import describe

        what = describe(self.info) if self.info else "a board (stock TVM RPC server: CPU not reported)"
        return f"{what}, over RPC at {self.where}"

    def check(self, path: Path, manifest: dict) -> None:
        """Refuse an artifact this board cannot run: a GPU build, another architecture, a CPU
        feature its kernels use that the board lacks."""
        from .cpuinfo import missing_features

        target = manifest["target"]
        if target["device"] != "cpu":
            raise FqError(f"{path}: a {target['device']} build; fq-bench runs CPU builds on boards")
        if self.info is None:
            return
        if target["arch"] != self.info["arch"]:
            raise FqError(f"{path}: built for target '{target['name']}' ({target['arch']}), but the board at "
                          f"{self.where} is {self.info['arch']}")
        missing = missing_features(target["tvm"], self.info)
        if missing:
            raise FqError(f"{path}: built for target '{target['name']}', whose kernels use {', '.join(missing)}; "
                          f"the board at {self.where} ({self.info['cpu']}) lacks it: rebuild with a target for it "
                          f"(e.g. rpi4 or arm-neon)")

    def set_threads(self, threads: int) -> None:
        """Threads of the board's TVM pool (affinity: big cores first)."""
        self.session.get_function("runtime.config_threadpool")(1, int(threads))

    def load(self, path: Path, manifest: dict) -> "RemoteModel":
        self.check(path, manifest)
        name = f"fq{len(self._models) + 1}-{manifest['library']}"
        try:
            self.session.upload(str(Path(path) / manifest["library"]), name)
            module = self.session.load_module(name)
        except Exception as err:
            hint = "" if self.info else (f" (the server does not report its CPU; the artifact is for "
                                         f"{manifest['target']['arch']}: is the board?)")
            raise FqError(f"{path}: the board at {self.where} cannot load it: {_last_line(err)}{hint}") from None
        model = RemoteModel(self.session.cpu(), module, manifest)
        self._models.append(model)
        return model

    def entry(self, path: Path, manifest: dict, threads: int | None = None):
        """A fq_tvm.benchmark.Entry for this artifact on the board."""
        from .benchmark import Entry, artifact_size, weight_bits

        if threads is not None:
            self.set_threads(threads)
        model = self.load(path, manifest)
        overall, dense = weight_bits(manifest)
        scheme = manifest["scheme"]["name"]
        return Entry(f"fq-tvm {scheme}", "fq-tvm", scheme, Path(path), model.run, model.time_block,
                     artifact_size(path), overall, dense, where=self.where)

    def close(self) -> None:
        """End the session: TVM closes it, and the board goes back to the pool, once no remote
        object is left, so the models loaded from it are emptied too (and cycles collected)."""
        import gc

        for model in self._models:
            model.release()
        self._models, self.session = [], None
        gc.collect()


class RemoteModel:
    """An artifact loaded on a board: run(inputs) -> outputs, time_block(inputs, seconds)."""

    def __init__(self, device, module, manifest: dict):
        from tvm.runtime.vm import VirtualMachine

        self.device = device
        self.vm = VirtualMachine(module, device)
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self._call_s = None  # seconds per call, once measured

    def release(self) -> None:
        self.vm = self.device = None

    def _set_inputs(self, inputs: dict) -> None:
        import tvm

        from .artifact import _check_input

        names = [spec["name"] for spec in self.inputs]
        if set(inputs) != set(names):
            raise FqError(f"inputs do not match the model: it takes {names}, got {sorted(inputs)}")
        args = [tvm.runtime.tensor(_check_input(spec, inputs[spec["name"]]), self.device) for spec in self.inputs]
        self.vm.set_input("main", *args)

    def run(self, inputs: dict) -> dict:
        self._set_inputs(inputs)
        self.vm.invoke_stateful("main")
        result = self.vm.get_outputs("main")
        values = list(result) if isinstance(result, tuple) else [result]
        return {spec["name"]: np.asarray(v.numpy()) for spec, v in zip(self.outputs, values)}

    def time_block(self, inputs: dict, seconds: float) -> list[float]:
        """Seconds per call of about `seconds` of calls, timed on the board (one call per repeat,
        after the evaluator's own unrecorded warm-up call)."""
        self._set_inputs(inputs)
        calls = 1 if self._call_s is None else max(1, min(10_000, int(seconds / max(self._call_s, 1e-6))))
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=calls)
        times = [float(t) for t in timer("main").results]
        self._call_s = float(np.median(times))
        return times
