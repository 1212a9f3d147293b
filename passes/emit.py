"""Emit the Relax bindings for one packed linear layer (kernels come from fq_tvm.schedules.kernels,
as target-independent TIR; schedules are applied at build time)."""

from __future__ import annotations

import numpy as np
from tvm import relax

from .lowering import PackedLinear, Rotation


def _kernels():
    from ..schedules import kernels

    return kernels


def _call(bb, func, name: str, args, out_shape, dtype="float32"):
    gvar = bb.add_func(func.with_attr("global_symbol", name), name)
    return bb.emit(relax.call_tir(gvar, args, relax.TensorType(out_shape, dtype)))


def _rotate(bb, x, rot: Rotation, inverse: bool):
    rows = x.ty.shape[0]
    func = _kernels().hadamard(rot.padded, rot.block, inverse)
    name = f"fq_hadamard{'_inv' if inverse else ''}_{rot.padded}_{rot.block}"
    return _call(bb, func, name, [x, relax.const(rot.signs.astype(np.float32))], [rows, rot.padded])


def _resize(bb, x, dim: int, new_dim: int):
    if dim == new_dim:
        return x
    rows = x.ty.shape[0]
    k = _kernels()
    func, kind = (k.pad_last(dim, new_dim), "pad") if new_dim > dim else (k.take_last(dim, new_dim), "take")
    return _call(bb, func, f"fq_{kind}_{dim}_{new_dim}", [x], [rows, new_dim])


def input_transform(bb, x2, layer: PackedLinear):
    """x2 [M, K] -> xf [M, cols]: pad, randomized Hadamard, frame analysis."""
    dim = layer.in_features
    if layer.in_rot is not None:
        x2 = _resize(bb, x2, dim, layer.in_rot.padded)
        x2 = _rotate(bb, x2, layer.in_rot, inverse=False)
        dim = layer.in_rot.padded
    if layer.frame is not None:
        frame = layer.frame
        two_k, two_l = frame.block.shape
        func = _kernels().frame_analysis(frame.nblk, two_l, two_k, frame.tail)
        name = f"fq_frame_{frame.nblk}x{two_k}x{two_l}_{frame.tail}"
        x2 = _call(bb, func, name, [x2, relax.const(frame.block.astype(np.float32))],
                   [x2.ty.shape[0], frame.out_dim])
        dim = frame.out_dim
    return _resize(bb, x2, dim, layer.cols)


def _weights(layer: PackedLinear, shared: dict) -> list:
    """The packed codes, scales and zeros as constants, one set per layer (a weight read by
    several nodes, or gathered and multiplied as a tied table, is stored once)."""
    key = ("weights", id(layer))
    if key not in shared:
        shared[key] = [relax.const(layer.packed), relax.const(layer.scale), relax.const(layer.zero)]
    return shared[key]


def inverse_input_transform(bb, e, layer: PackedLinear):
    """e [M, cols] -> [M, K]: T_K^T e, the transpose of input_transform (frame synthesis P^T, then
    the inverse randomized Hadamard, then the padding dropped)."""
    dim = layer.cols
    if layer.frame is not None:
        frame = layer.frame
        two_k, two_l = frame.block.shape
        e = _resize(bb, e, dim, frame.out_dim)
        func = _kernels().frame_synthesis(frame.nblk, two_l, two_k, frame.tail)
        name = f"fq_frame_synthesis_{frame.nblk}x{two_k}x{two_l}_{frame.tail}"
        e = _call(bb, func, name, [e, relax.const(frame.block.astype(np.float32))], [e.ty.shape[0], frame.in_dim])
        dim = frame.in_dim
    if layer.in_rot is not None:
        e = _resize(bb, e, dim, layer.in_rot.padded)
        e = _rotate(bb, e, layer.in_rot, inverse=True)
        dim = layer.in_rot.padded
    return _resize(bb, e, dim, layer.in_features)


def code_gather(bb, ids, layer: PackedLinear, shared: dict):
    """Bindings computing W_hat[ids] for integer ids [...] of a layer stored without an output
    rotation (a quantized tied embedding): gather and decode the code rows, then T_K^T. Returns
    the output expr [..., K]."""
    if layer.out_rot is not None:
        raise ValueError(f"{layer.name}: rows cannot be gathered under an output rotation")
    shape = list(ids.ty.shape)
    flat = bb.emit(relax.op.reshape(ids, [-1])) if len(shape) != 1 else ids
    if flat.ty.dtype != "int64":
        flat = bb.emit(relax.op.astype(flat, "int64"))
    func = _kernels().code_gather(layer.rows, layer.cols, layer.bits, layer.group_size)
    name = f"fq_code_gather_{layer.rows}_{layer.cols}_b{layer.bits}_g{layer.group_size}"
    e = _call(bb, func, name, [flat, *_weights(layer, shared)], [flat.ty.shape[0], layer.cols])
    e = inverse_input_transform(bb, e, layer)
    if len(shape) == 1:
        return e
    return relax.op.reshape(e, shape + [layer.in_features])


def _transformed_input(bb, x, layer: PackedLinear, shared: dict):
    key = (x, layer.input_key())
    if key not in shared:
        x2 = bb.emit(relax.op.reshape(x, [-1, layer.in_features])) if len(x.ty.shape) != 2 else x
        shared[key] = input_transform(bb, x2, layer)
    return shared[key]


def joinable(a: PackedLinear, b: PackedLinear) -> bool:
    """Layers reading one input that can run as one dequant-matmul with their rows stacked: the same
    input transform and code format, and output rotations (if any) of the same block that divide
    their rows, with no padding to drop."""
    ra, rb = a.out_rot, b.out_rot
    if a.input_key() != b.input_key() or _format(a) != _format(b):
        return False
    if (ra is None) != (rb is None):
        return False
    return all(r is None or (r.padded == r.dim == layer.rows and layer.rows % r.block == 0 and r.block == ra.block)
               for r, layer in ((ra, a), (rb, b)))


def _format(layer: PackedLinear) -> tuple:
    return layer.bits, layer.code_bits, layer.group_size, layer.act_group


def stacked(layers: list[PackedLinear]) -> PackedLinear:
    """One layer computing the given joinable layers' outputs side by side ([..., sum N])."""
    first = layers[0]
    out_rot = None
    if first.out_rot is not None:
        n = sum(layer.rows for layer in layers)
        out_rot = Rotation(n, n, first.out_rot.block, np.concatenate([layer.out_rot.signs for layer in layers]))
    return PackedLinear(
        name="+".join(layer.name for layer in layers), in_features=first.in_features,
        out_features=sum(layer.out_features for layer in layers), bits=first.bits, cols=first.cols,
        group_size=first.group_size, packed=np.concatenate([layer.packed for layer in layers]),
        scale=np.concatenate([layer.scale for layer in layers]), zero=np.concatenate([layer.zero for layer in layers]),
        in_rot=first.in_rot, frame=first.frame, out_rot=out_rot, act_group=first.act_group,
        code_bits=first.code_bits)


def packed_linears(bb, x, layers: list[PackedLinear], shared: dict) -> list:
    """The outputs [..., N_i] of joinable layers reading x, computed as one stacked layer (one
    dequant-matmul and one inverse rotation: the blocks of a Hadamard never cross two layers' rows)
    and sliced apart."""
    if len(layers) == 1:
        return [packed_linear(bb, x, layers[0], shared)]
    key = ("stacked", tuple(layer.name for layer in layers))
    if key not in shared:  # kept alive there: _weights keys a layer's constants by id(layer)
        shared[key] = stacked(layers)
    both = packed_linear(bb, x, shared[key], shared)
    both = both if isinstance(both, relax.Var) else bb.emit(both)
    axis, outs, start = len(x.ty.shape) - 1, [], 0
    for layer in layers:
        end = start + layer.out_features
        outs.append(relax.op.strided_slice(both, axes=[axis], begin=[start], end=[end], assume_inbound=True))
        start = end
    return outs


def packed_linear(bb, x, layer: PackedLinear, shared: dict):
    """Bindings computing x @ W_hat^T for x [..., K]; returns the output expr [..., N]."""
    shape = list(x.ty.shape)
    xf = _transformed_input(bb, x, layer, shared)
    rows = xf.ty.shape[0]
    func = _kernels().dequant_matmul(layer.rows, layer.cols, layer.bits, layer.group_size, layer.act_group,
                                     layer.code_bits)
    name = (f"fq_dequant_matmul_{layer.rows}_{layer.cols}_b{layer.bits}_g{layer.group_size}_a{layer.act_group}"
            + (f"_c{layer.code_bits}" if layer.code_bits else ""))
    u = _call(bb, func, name, [xf, *_weights(layer, shared)], [rows, layer.rows])
    dim = layer.rows
    if layer.out_rot is not None:
        u = _rotate(bb, u, layer.out_rot, inverse=True)
        dim = layer.out_rot.padded
    u = _resize(bb, u, dim, layer.out_features)
    if len(shape) == 2:
        return u
    return relax.op.reshape(u, shape[:-1] + [layer.out_features])
