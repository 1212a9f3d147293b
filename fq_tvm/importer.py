"""ONNX -> Relax import, with errors that name the offending op and node."""

from __future__ import annotations

import gc
import warnings

import onnx
import tvm
from tvm.relax.frontend import detach_params
from tvm.relax.frontend import onnx as relax_onnx

from .errors import FqError
from .onnx_io import signature
from .rnn import RECURRENT, unsupported


def supported_ops() -> set[str]:
    """Op types TVM's Relax ONNX importer converts (plus those it handles inline)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map()) | {"Constant", "If"}


def check_ops(model: onnx.ModelProto) -> None:
    """Raise FqError naming the first unsupported op and its node."""
    known = supported_ops()
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            name = node.name or f"#{i}"
            domain = f" (domain '{node.domain}')" if node.domain not in ("", "ai.onnx") else ""
            why = unsupported(model, node) if node.op_type in RECURRENT else ""
            hint = f" ({why})" if why else ""
            raise FqError(f"unsupported ONNX op '{node.op_type}'{domain} at node '{name}'{hint}")


def param_name(initializer_name: str) -> str:
    """The Relax parameter name TVM's importer gives an ONNX initializer."""
    return initializer_name.removeprefix("onnx::")


def to_relax(model: onnx.ModelProto) -> tuple[tvm.IRModule, dict]:
    """Import `model` (after frontend.prepare) into Relax with weights kept as named parameters
    of `main`.

    Returns (module, {parameter name: tvm.runtime.Tensor}); `bind_weights` turns them into constants
    once the graph rewrites that need the names are done. A failure is one FqError line naming
    the ONNX node; FQ_DEBUG=1 also shows TVM's output and traceback.
    """
    from .frontend import quiet_output
    from .onnx_fix import Hooks, NodeError, installed

    check_ops(model)
    dtypes = {v["name"]: v["dtype"] for v in signature(model)["inputs"]}
    failure = None
    with warnings.catch_warnings(), quiet_output():
        warnings.simplefilter("ignore")
        try:
            with installed(Hooks(model)):
                mod = relax_onnx.from_onnx(model, dtype_dict=dtypes, keep_params_in_input=True)
            mod, params = detach_params(mod)
        except FqError as err:
            failure = str(err)
        except NodeError as err:
            _debug_traceback(err)
            failure = f"cannot import the model: {err}"
        except Exception as err:  # noqa: BLE001 - TVM raises many kinds; one line for all
            _debug_traceback(err)
            text = [line for line in str(err).strip().splitlines() if line.strip()]
            failure = f"TVM's ONNX importer failed: {text[-1].strip() if text else type(err).__name__}"
        gc.collect()  # TVM warns when the failed import's BlockBuilder is freed: do it while quiet
    if failure:
        raise FqError(failure)
    func = mod["main"]
    num_inputs = int(func.attrs["num_input"])
    names = [var.name for var in func.params[num_inputs:]]
    return mod, dict(zip(names, params.get("main", [])))  # TVM's tensors: no second copy of the weights


def _debug_traceback(err: Exception) -> None:
    import os
    import sys
    import traceback

    if os.environ.get("FQ_DEBUG") == "1":
        traceback.print_exception(err.__cause__ or err, file=sys.stderr)


def bind_weights(mod: tvm.IRModule, weights: dict) -> tvm.IRModule:
    """Bind the remaining weight parameters of `main` as constants."""
    func = mod["main"]
    present = {var.name for var in func.params}
    bound = {name: value if isinstance(value, tvm.runtime.Tensor) else tvm.runtime.tensor(value)
             for name, value in weights.items() if name in present}
    return tvm.relax.transform.BindParams("main", bound)(mod) if bound else mod
