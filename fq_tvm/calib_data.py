"""Check calibration samples against the model's inputs before any work is done.

Arrays keep the model's rank with samples along axis 0 (the batch axis). Safe casts (float64 ->
float32, int32 -> int64) happen with a note; anything else is refused with one line naming the
input (and, for NaN / Inf, the sample). The batch size of the calibration runs follows a static
batch dim of the model.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import FqError
from .npz import read_npz

DEFAULT_BATCH = 8


def _inputs(model):
    inits = {t.name for t in model.graph.initializer}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        yield v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)), dims


def _show(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def validate(model, data: dict, samples: int | None = None) -> tuple[dict, int, list[str]]:
    """(arrays cast and trimmed, batch size, notes) or FqError naming the input."""
    if samples is not None and samples < 1:
        raise FqError(f"--calib-samples must be at least 1, not {samples}")
    out, notes, static_batch = {}, [], None
    for name, dtype, dims in _inputs(model):
        if name not in data:
            raise FqError(f"calibration failed: samples lack model inputs: {name} ({dtype.name} {_show(dims)}); "
                          f"the data has: {', '.join(sorted(data)) or 'nothing'}")
        arr = _cast(name, np.asarray(data[name]), dtype, notes)
        if arr.ndim != len(dims):
            raise FqError(f"calibration input '{name}': rank {arr.ndim} {list(arr.shape)}, the model expects "
                          f"rank {len(dims)} {_show(dims)} (samples along axis 0)")
        for axis, (have, want) in enumerate(zip(arr.shape, dims)):
            if axis > 0 and isinstance(want, int) and have != want:
                raise FqError(f"calibration input '{name}': shape {list(arr.shape)}, the model expects "
                              f"{_show(dims)} (axis {axis} must be {want})")
        if dims and isinstance(dims[0], int):
            static_batch = dims[0]
        _check_finite(name, arr)
        out[name] = arr
    return _trim(out, samples, static_batch, notes)


def _cast(name, arr, dtype, notes):
    if arr.dtype == dtype:
        return arr
    kinds = {arr.dtype.kind, dtype.kind}
    if kinds <= {"f"} or kinds <= {"i", "u"}:
        cast = arr.astype(dtype)
        if dtype.kind in "iu" and not np.array_equal(cast, arr):
            raise FqError(f"calibration input '{name}': {arr.dtype.name} values do not fit the model's {dtype.name}")
        notes.append(f"calibration input '{name}': cast {arr.dtype.name} to the model's {dtype.name}")
        return cast
    raise FqError(f"calibration input '{name}': dtype {arr.dtype.name}, the model expects {dtype.name}")


def _check_finite(name, arr):
    if arr.dtype.kind != "f" or np.isfinite(arr).all():
        return
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    first = int(np.flatnonzero(bad)[0])
    what = "NaN" if np.isnan(arr[first]).any() else "Inf"
    raise FqError(f"calibration input '{name}': sample {first} contains {what} "
                  f"({int(bad.sum())} of {len(arr)} samples are not finite)")


def _trim(arrays, samples, static_batch, notes):
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise FqError("calibration inputs differ in sample count: "
                      + ", ".join(f"{k}: {len(a)}" for k, a in arrays.items()))
    total = lengths.pop() if lengths else 0
    if total == 0:
        raise FqError("calibration data has no samples")
    if samples is not None:
        if samples > total:
            notes.append(f"--calib-samples {samples}: the file has {total}; using all")
        total = min(total, samples)
    batch = static_batch or DEFAULT_BATCH
    if static_batch:
        if total < static_batch:
            raise FqError(f"calibration data has {total} samples; the model's batch dim is fixed at {static_batch}")
        usable = total - total % static_batch
        if usable != total:
            notes.append(f"calibration: the model's batch is fixed at {static_batch}; using {usable} of {total} samples")
        total = usable
    return {k: a[:total] for k, a in arrays.items()}, batch, notes


def read(calib) -> dict:
    """{input name: array} from an .npz path or a dict; FqError if unreadable."""
    return dict(calib) if isinstance(calib, dict) else read_npz(calib)


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TEXT_SAMPLES = 64
DEFAULT_SEQ = 128


def from_text(model_path, text_path, tokenizer_dir, samples: int | None = None) -> dict:
    """Calibration inputs for a token-id model from a plain text file (one sample per paragraph,
    paragraphs split by blank lines) and a `tokenizers` tokenizer.json (`--calib-text --tokenizer`).
    Padded / truncated to the model's static sequence length, else to the longest paragraph (at
    most 128 tokens)."""
    from pathlib import Path

    texts = _paragraphs(Path(text_path))
    tok = _tokenizer(Path(tokenizer_dir))
    from .onnx_io import load_model

    inputs = list(_inputs(load_model(model_path)))
    other = [name for name, _, _ in inputs if name not in TEXT_INPUTS]
    if other or not any(name == "input_ids" for name, _, _ in inputs):
        raise FqError(f"--calib-text builds only {', '.join(TEXT_INPUTS)}; the model's inputs are "
                      f"{', '.join(n for n, _, _ in inputs)}: pass --calib FILE.npz")
    texts = texts[: samples or MAX_TEXT_SAMPLES]
    dims = next(d for n, _, d in inputs if n == "input_ids")
    seq = dims[1] if len(dims) > 1 and isinstance(dims[1], int) else None
    encodings = tok.encode_batch(texts)
    seq = seq or min(max(len(e.ids) for e in encodings), DEFAULT_SEQ)
    arrays = {name: np.zeros((len(texts), seq), np.int64) for name in TEXT_INPUTS}
    for row, enc in enumerate(encodings):
        n = min(len(enc.ids), seq)
        arrays["input_ids"][row, :n] = enc.ids[:n]
        arrays["attention_mask"][row, :n] = 1
        arrays["token_type_ids"][row, :n] = enc.type_ids[:n]
    return {name: arrays[name] for name, _, _ in inputs}


def _paragraphs(path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise FqError(f"{path}: cannot read the calibration text ({err.strerror or err})") from None
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise FqError(f"{path}: the calibration text is empty")
    return paragraphs


def _tokenizer(path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise FqError("--calib-text needs the 'tokenizers' package: pip install tokenizers") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FqError(f"{path}: no tokenizer.json there (--tokenizer takes a directory with tokenizer.json or the file)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001
        raise FqError(f"{file}: not a readable tokenizer.json ({str(err).splitlines()[0][:200]})") from None
