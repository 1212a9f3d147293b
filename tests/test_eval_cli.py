"""fq-eval's bad inputs, each one line on stderr and exit status 1, before any real model or data is
read: a file that is not the model fq-eval feeds, an unreadable or missing .onnx, window counts that
make no perplexity. (The metrics themselves: test_real_models.py, test_real_smollm2.py.)"""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from fq_tvm.realcli import eval_main


def _linear_onnx(path):
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return path


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fq-eval: error: "), err
    return err[0]


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_a_model_with_other_inputs_is_one_line(tmp_path, capsys, model):
    path = _linear_onnx(tmp_path / "linear.onnx")
    assert eval_main([model, str(path)]) == 1
    assert f"takes ['x'] and gives ['y']; fq-eval {model} feeds" in _one_line(capsys)
    assert eval_main([model, str(path), "--reference", str(path)]) == 1  # the reference too
    assert "takes ['x']" in _one_line(capsys)


def test_unreadable_missing_and_bad_windows_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    assert eval_main(["minilm", str(bad)]) == 1
    assert _one_line(capsys) == f"fq-eval: error: {bad}: not a readable ONNX model (InvalidProtobuf)"
    assert eval_main(["minilm", str(tmp_path / "none.onnx")]) == 1
    assert _one_line(capsys) == f"fq-eval: error: {tmp_path / 'none.onnx'}: no such .onnx file"
    assert eval_main(["smollm2", str(tmp_path / "none"), "--reference", str(bad)]) == 1
    assert "no such artifact directory" in _one_line(capsys)
    for flags in (["--windows", "0"], ["--window", "1"]):
        assert eval_main(["smollm2", str(bad), *flags]) == 1
        assert "--windows must be at least 1 and --window at least 2" in _one_line(capsys)


def test_more_windows_than_the_book_holds_is_one_line():
    """austen_windows (fq-eval smollm2 --windows N) past the book's end: an FqError naming how many
    windows fit (it was a ValueError, which fq-eval printed as an internal error)."""
    from fq_tvm import FqError, evaluate

    def tokenizer(text):
        return {"input_ids": list(range(1100))}

    assert evaluate.austen_windows(tokenizer, 2, 512).shape == (2, 512)
    with pytest.raises(FqError, match=r"^prideprejudice has 1100 tokens: at most 2 windows of 512, not 3$"):
        evaluate.austen_windows(tokenizer, 3, 512)


def test_runner_of_a_missing_model_is_one_line(tmp_path):
    from fq_tvm import FqError, evaluate

    with pytest.raises(FqError, match=r"no\.onnx: neither an \.onnx file nor an artifact directory$"):
        evaluate.runner(tmp_path / "no.onnx")
