"""Gathers (TVM `take` in "fast" mode: no bounds check): where the indices are a model input, the
manifest records its range and the loader refuses values outside it, so TVM's warning "Fast mode
segfaults when there are out-of-bounds indices" is dropped; where they are computed, it stays
(unless -q)."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fq_tvm.artifact import load
from fq_tvm.cli import compile_main
from fq_tvm.gathers import FAST_TAKE_WARNING
from fq_tvm.errors import FqError

TABLE = np.arange(100 * 8, dtype=np.float32).reshape(100, 8)


def _gather_model(path, shift: int = 0, both: bool = False):
    """y = TABLE[ids]; with shift TABLE[ids + shift] (indices the compiler cannot bound); with
    both the sum of the two."""
    nodes, ids = [], "ids"
    inits = [numpy_helper.from_array(TABLE, "table")]
    if shift:
        inits.append(numpy_helper.from_array(np.array(shift, np.int64), "shift"))
        nodes.append(helper.make_node("Add", ["ids", "shift"], ["moved"]))
        ids = "moved"
    if both:
        nodes += [helper.make_node("Gather", ["table", "ids"], ["direct"], axis=0),
                  helper.make_node("Gather", ["table", ids], ["shifted"], axis=0),
                  helper.make_node("Add", ["direct", "shifted"], ["y"])]
    else:
        nodes.append(helper.make_node("Gather", ["table", ids], ["y"], axis=0))
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def gather_art(tmp_path_factory):
    work = tmp_path_factory.mktemp("gather")
    out = work / "gather.fq"
    assert compile_main([str(_gather_model(work / "gather.onnx")), "-o", str(out), "-q"]) == 0
    return out


def test_input_indices_get_a_range_and_no_warning(tmp_path, capfd):
    model = _gather_model(tmp_path / "gather.onnx")
    assert compile_main([str(model), "-o", str(tmp_path / "art")]) == 0
    err = capfd.readouterr().err
    assert FAST_TAKE_WARNING not in err and "compiled in" in err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["b", "s"], "range": [0, 100]}]


def test_loader_refuses_indices_out_of_range(gather_art):
    model = load(gather_art)
    ids = np.array([[0, 7, 99]])
    np.testing.assert_array_equal(model.run({"ids": ids})["y"], TABLE[ids])
    for bad, low, high in (([[5, 100]], 5, 100), ([[-1, 3]], -1, 3), ([[10**12]], 10**12, 10**12)):
        with pytest.raises(FqError, match=rf"input 'ids' has values from {low} to {high}; it indexes a table of "
                                          rf"100 rows, so each must be in \[0, 100\)"):
            model.run({"ids": np.array(bad)})


def test_manifest_range_is_validated(gather_art, tmp_path):
    import shutil

    art = shutil.copytree(gather_art, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["inputs"][0]["range"] = [100, 0]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FqError, match="'inputs' entry 'ids' has a 'range' that is not \\[low, high\\] integers"):
        load(art)


def test_computed_indices_keep_the_warning_unless_quiet(tmp_path, capfd):
    model = _gather_model(tmp_path / "shifted.onnx", shift=1)
    assert compile_main([str(model), "-o", str(tmp_path / "loud")]) == 0
    assert FAST_TAKE_WARNING in capfd.readouterr().err
    assert "range" not in json.loads((tmp_path / "loud" / "manifest.json").read_text())["inputs"][0]
    assert compile_main([str(model), "-o", str(tmp_path / "quiet"), "-q"]) == 0
    assert capfd.readouterr() == ("", "")


def test_input_gets_its_range_beside_an_unbounded_gather(tmp_path, capfd):
    model = _gather_model(tmp_path / "both.onnx", shift=1, both=True)
    assert compile_main([str(model), "-o", str(tmp_path / "both")]) == 0
    assert FAST_TAKE_WARNING in capfd.readouterr().err
    assert json.loads((tmp_path / "both" / "manifest.json").read_text())["inputs"][0]["range"] == [0, 100]
    with pytest.raises(FqError, match="input 'ids' has values from 100 to 100"):
        load(tmp_path / "both").run({"ids": np.array([[100]])})
