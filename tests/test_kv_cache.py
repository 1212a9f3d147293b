"""passes/kv_cache.py: a KV-cache graph's concats of past and new keys become in-place appends to the
first `total` rows (a view) of seq-major cache buffers (`main_kv`), read by attention through
permute_dims. The artifact-level check
(main_kv against main_last on a tiny Llama, step by step) is in tests/test_generate.py."""

import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fq_tvm.passes.kv_cache import AddCacheInPlace


@I.ir_module
class Before:
    @R.function
    def main(input_ids: R.Tensor(("b", "s"), "int64"), position_ids: R.Tensor(("b", "s"), "int64"),
             past_key_0: R.Tensor(("b", 2, "p", 4), "float32"), past_value_0: R.Tensor(("b", 2, "p", 4), "float32")):
        b, s, p = T.int64(), T.int64(), T.int64()
        with R.dataflow():
            x = R.astype(input_ids, "float32")
            k = R.broadcast_to(R.reshape(x, R.shape([b, 1, s, 1])), R.shape([b, 2, s, 4]))
            v_seq = R.broadcast_to(R.reshape(x, R.shape([b, s, 1, 1])), R.shape([b, s, 2, 4]))
            v = R.permute_dims(v_seq, [0, 2, 1, 3])
            key = R.concat((past_key_0, k), axis=2)
            value = R.concat((past_value_0, v), axis=2)
            logits = R.sum(R.matmul(key, R.permute_dims(value, [0, 1, 3, 2])), axis=[1, 3])
            R.output(logits, key, value)
        return (logits, key, value)


@I.ir_module(check_well_formed=False)  # the kernels' blocks (as kernels.kv_append writes them)
class Expected:  # what the pass adds beside Before's main
    @R.function
    def main_kv(input_ids: R.Tensor(("b", "s"), "int64"), position_ids: R.Tensor(("b", "s"), "int64"),
                length: R.Shape(["total"]), cache_key_0: R.Tensor(("b", "capacity", 2, 4), "float32"),
                cache_value_0: R.Tensor(("b", "capacity", 2, 4), "float32")):
        R.func_attr({"global_symbol": "main_kv"})
        b, s, total = T.int64(), T.int64(), T.int64()
        cls = Expected
        with R.dataflow():
            x = R.astype(input_ids, "float32")
            k = R.broadcast_to(R.reshape(x, R.shape([b, 1, s, 1])), R.shape([b, 2, s, 4]))
            v_seq = R.broadcast_to(R.reshape(x, R.shape([b, s, 1, 1])), R.shape([b, s, 2, 4]))
            no_dtype = R.null_value()
            key_rows = R.memory.view(cache_key_0, R.shape([b, total, 2, 4]), no_dtype, R.tuple())
            keys = R.call_tir_inplace(cls.kv_append_2x4, (key_rows, k), [0], R.Tensor((b, total, 2, 4), "float32"))
            key = R.permute_dims(keys, [0, 2, 1, 3])
            no_dtype2 = R.null_value()
            value_rows = R.memory.view(cache_value_0, R.shape([b, total, 2, 4]), no_dtype2, R.tuple())
            values = R.call_tir_inplace(cls.kv_append_2x4_seq, (value_rows, v_seq), [0],
                                        R.Tensor((b, total, 2, 4), "float32"))
            value = R.permute_dims(values, [0, 2, 1, 3])
            logits = R.sum(R.matmul(key, R.permute_dims(value, [0, 1, 3, 2])), axis=[1, 3])
            R.output(logits)
        return logits

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append_2x4(cache_h: T.handle, new_h: T.handle):
        T.func_attr({"fq_kernel": "kv_append", "op_pattern": 8})
        batch, total, seq = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (batch, total, 2, 4), "float32")
        new = T.match_buffer(new_h, (batch, 2, seq, 4), "float32")
        with T.sblock("root"):
            for b, s, h, d in T.grid(batch, seq, 2, 4):
                with T.sblock("append"):
                    vb, vs, vh, vd = T.axis.remap("SSSS", [b, s, h, d])
                    T.reads(new[vb, vh, vs, vd])
                    T.writes(cache[vb, total - seq + vs, vh, vd])
                    cache[vb, total - seq + vs, vh, vd] = new[vb, vh, vs, vd]

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append_2x4_seq(cache_h: T.handle, new_h: T.handle):
        T.func_attr({"fq_kernel": "kv_append", "op_pattern": 8})
        batch, total, seq = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (batch, total, 2, 4), "float32")
        new = T.match_buffer(new_h, (batch, seq, 2, 4), "float32")
        with T.sblock("root"):
            for b, s, h, d in T.grid(batch, seq, 2, 4):
                with T.sblock("append"):
                    vb, vs, vh, vd = T.axis.remap("SSSS", [b, s, h, d])
                    T.reads(new[vb, vs, vh, vd])
                    T.writes(cache[vb, total - seq + vs, vh, vd])
                    cache[vb, total - seq + vs, vh, vd] = new[vb, vs, vh, vd]


def test_concats_become_in_place_appends():
    """Keys arrive heads-major, values through permute_dims of a seq-major tensor (read before
    the permute); past = total - seq."""
    out = AddCacheInPlace(2)(Before)
    tvm.ir.assert_structural_equal(out["main"], Before["main"])
    added = tvm.IRModule({gvar: func for gvar, func in out.functions_items() if gvar.name_hint != "main"})
    tvm.ir.assert_structural_equal(added, Expected)


def test_a_past_read_twice_is_left_alone():
    """A past tensor used by more than its concat (or a count that does not match) is not a
    cache this pass can own: the module comes back unchanged."""

    @I.ir_module
    class Twice:
        @R.function
        def main(input_ids: R.Tensor(("b", "s"), "int64"), past_key_0: R.Tensor(("b", 2, "p", 4), "float32")):
            b, s, p = T.int64(), T.int64(), T.int64()
            with R.dataflow():
                x = R.astype(input_ids, "float32")
                k = R.broadcast_to(R.reshape(x, R.shape([b, 1, s, 1])), R.shape([b, 2, s, 4]))
                key = R.concat((past_key_0, k), axis=2)
                again = R.sum(past_key_0, axis=[2])
                R.output(key, again)
            return (key, again)

    tvm.ir.assert_structural_equal(AddCacheInPlace(1)(Twice), Twice)
    tvm.ir.assert_structural_equal(AddCacheInPlace(2)(Before), AddCacheInPlace(2)(Before))
    assert "main_kv" not in [g.name_hint for g in AddCacheInPlace(3)(Before).get_global_vars()]
