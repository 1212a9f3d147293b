"""Layer names come from the torch module path the exporter records (one layer, one name: the
same name in progress lines, --skip, records and the manifest)."""

from onnx import helper

from fq_tvm.quantize import display_name


def _node(scopes=None):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="node_linear_3")
    if scopes is not None:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
    return node


def test_torch_2_13_cumulative_scopes_give_the_module_path_once():
    scopes = ["", "lm", "lm.model", "lm.model.layers.0", "lm.model.layers.0.self_attn",
              "lm.model.layers.0.self_attn.q_proj", "linear"]
    assert display_name(_node(scopes)) == "lm.model.layers.0.self_attn.q_proj"


def test_relative_scopes_are_joined():
    assert display_name(_node(["", "model", "layers.0", "mlp", "down_proj", "linear"])) == "model.layers.0.mlp.down_proj"


def test_without_scopes_the_node_name():
    assert display_name(_node()) == "node_linear_3"
    assert display_name(_node(["", "linear"])) == "node_linear_3"
    bad = _node()
    bad.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="not a list [")
    assert display_name(bad) == "node_linear_3"
