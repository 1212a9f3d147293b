"""Reading .npz files of named arrays (fq-run's inputs, fq-bench's, calibration files). numpy
only: fq-run runs on boards that have TVM's runtime and numpy and nothing else (no onnx)."""

from __future__ import annotations

import os

import numpy as np

from .errors import FqError

NPY_MAGIC, ZIP_MAGICS = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")


def read_npz(path) -> dict:
    """The arrays of an .npz file written by numpy.savez; FqError for anything else."""
    if not os.path.exists(path):
        raise FqError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise FqError(f"{path}: not a regular file")
    with open(path, "rb") as handle:
        head = handle.read(6)
    if head.startswith(NPY_MAGIC):
        raise FqError(f"{path}: a single .npy array, not an .npz archive; save inputs with "
                      f"numpy.savez(FILE, INPUT_NAME=array)")
    if not head.startswith(ZIP_MAGICS):
        raise FqError(f"{path}: not an .npz file (an .npz is the zip archive numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as err:
        if isinstance(err, ValueError) and "allow_pickle" in str(err):
            raise FqError(f"{path}: holds Python objects, not numeric arrays; only numeric arrays are read") \
                from None
        raise FqError(f"{path}: not a readable .npz file ({str(err).splitlines()[0]})") from None
