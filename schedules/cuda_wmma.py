"""The five WMMA tensor intrinsics the CUDA tensor-core kernel needs (16 x 16 x 16, float16 in,
float32 accumulators, B stored as [n, k]), registered on first use.

`tvm.s_tir.tensor_intrin.cuda` has these among hundreds of others, but importing it parses them
all (about 37 s of CPU here), once per build process; these five parse in well under a second.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

F16, F32 = "float16", "float32"
NAMES = {"fill": "fq_wmma_fill_f32", "load_a": "fq_wmma_load_a_f16", "load_b": "fq_wmma_load_b_f16_nk",
         "mma": "fq_wmma_mma_f16_f32_nk", "store": "fq_wmma_store_f32"}
_registered: set[str] = set()


def _fragment(buf, stride):
    """Which 16 x 16 fragment of its fragment array a buffer view is."""
    return buf.elem_offset // stride // 16 * (stride // 16) + buf.elem_offset % stride // 16


def _copy(src_scope: str, dst_scope: str, dtype: str, layout: str, load: bool):
    """A 16 x 16 copy between memory and a fragment: load_matrix_sync or store_matrix_sync."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 16), dtype, align=64, offset_factor=16, scope=src_scope)
        C = T.match_buffer(c, (16, 16), dtype, align=64, offset_factor=16, scope=dst_scope)
        with T.sblock("root"):
            T.reads(A[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        sa, sc = T.int32(), T.int32()
        A = T.match_buffer(a, (16, 16), dtype, align=64, offset_factor=16, scope=src_scope, strides=[sa, 1])
        C = T.match_buffer(c, (16, 16), dtype, align=64, offset_factor=16, scope=dst_scope, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(A[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            if load:
                T.evaluate(T.tvm_load_matrix_sync(C.data, 16, 16, 16, _fragment(C, sc),
                                                  A.access_ptr("r", ptr_type=dtype), sa, layout, dtype="void"))
            else:
                T.evaluate(T.tvm_store_matrix_sync(A.data, 16, 16, 16, _fragment(A, sa),
                                                   C.access_ptr("w", ptr_type=dtype), sc, layout, dtype="void"))

    return desc, impl


def _fill():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=16, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        sc = T.int32()
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=16, scope="wmma.accumulator", strides=[sc, 1])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_fill_fragment(C.data, 16, 16, 16, _fragment(C, sc), T.float32(0), dtype="void"))

    return desc, impl


def _mma():
    """C[i, j] += A[i, k] * B[j, k], products of float16 values summed in float32."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 16), F16, align=64, offset_factor=16, scope="wmma.matrix_a")
        B = T.match_buffer(b, (16, 16), F16, align=64, offset_factor=16, scope="wmma.matrix_b")
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=16, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast(F32, A[vi, vk]) * T.Cast(F32, B[vj, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa, sb, sc = T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (16, 16), F16, align=64, offset_factor=16, scope="wmma.matrix_a", strides=[sa, 1])
        B = T.match_buffer(b, (16, 16), F16, align=64, offset_factor=16, scope="wmma.matrix_b", strides=[sb, 1])
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=16, scope="wmma.accumulator", strides=[sc, 1])
        with T.sblock("root"):
            T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_mma_sync(C.data, _fragment(C, sc), A.data, _fragment(A, sa),
                                      B.data, _fragment(B, sb), C.data, _fragment(C, sc), dtype="void"))

    return desc, impl


def intrinsics(load_scope: str, store_scope: str) -> dict[str, str]:
    """Register (once) and name the intrinsics for operands staged in `load_scope` and results
    stored to `store_scope`."""
    scopes = {"load_a": load_scope, "load_b": load_scope, "store": store_scope}  # named by their scope too
    names = {key: f"{name}_{scopes[key].replace('.', '_')}" if key in scopes else name for key, name in NAMES.items()}
    makers = {"fill": _fill, "mma": _mma,
              "load_a": lambda: _copy(load_scope, "wmma.matrix_a", F16, "row_major", True),
              "load_b": lambda: _copy(load_scope, "wmma.matrix_b", F16, "col_major", True),
              "store": lambda: _copy("wmma.accumulator", store_scope, F32, "row_major", False)}
    for key, name in names.items():
        if name not in _registered:
            TensorIntrin.register(name, *makers[key](), override=True)
            _registered.add(name)
    return names
