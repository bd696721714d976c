"""How codes are stored, in numpy: int8 codes with an offset, and 4-bit codes two a byte.

TensorRT's ONNX parser (8.x) has no UINT8 tensors and Casts only between FP32/FP16/INT32/INT8/
BOOL, and it lacks BitShift; so codes are int8 ``code − offset`` (offset 128 when K > 128) and
4-bit codes are packed as byte = 16·hi + lo − 128, unpacked with integer Div/Mul/Sub (see
``edits.decode``, which builds the same computation as graph nodes).
"""

from __future__ import annotations

import numpy as np


def code_offset(k: int) -> int:
    """Codes are stored as int8 ``code − offset``: TensorRT's ONNX parser (8.x) has no UINT8
    tensors and Cast only between FP32/FP16/INT32/INT8/BOOL, so uint8 codes could not be parsed.
    Codebooks of up to 128 centroids need no offset; larger ones store code − 128 and the decode
    adds 128 back after the Cast to int32."""
    return 128 if k > 128 else 0


def stored_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """The int8 initializer for codes 0..k−1 (see ``code_offset``)."""
    return (codes.astype(np.int16) - code_offset(k)).astype(np.int8)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (0..15) two a byte, as int8 (TensorRT parses no UINT8): the n codes in
    row-major order are cut in halves, the first ⌈n/2⌉ give the high nibbles, the rest (padded
    with one 0 when n is odd) the low ones, and byte i = 16·hi_i + lo_i − 128. Halves rather than
    neighbours, so the decode joins them with one Concat instead of interleaving."""
    flat = codes.reshape(-1).astype(np.int16)
    if flat.size and flat.max() > 15:
        raise ValueError("4-bit codes must be < 16")
    h = (flat.size + 1) // 2
    lo = np.zeros(h, dtype=np.int16)
    lo[:flat.size - h] = flat[h:]
    return (16 * flat[:h] + lo - 128).astype(np.int8)


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The n codes ``pack_codes`` stored (int64), in numpy: what the decode subgraph computes."""
    v = packed.astype(np.int64) + 128
    hi = v // 16
    return np.concatenate([hi, v - 16 * hi])[:n]


def decoded_weight(layer_shape, rows_of, codebook, stored) -> np.ndarray:
    """The weight the decode subgraph computes from the stored (int8) codes, in numpy; 1-D
    ``stored`` are packed 4-bit codes (``pack_codes``), 2-D ones a byte a code."""
    cb = codebook.astype(np.float32)
    if stored.ndim == 1:
        n = int(np.prod(layer_shape)) // cb.shape[1]
        rows = layer_shape[1] if rows_of == "transpose" else layer_shape[0]
        codes = unpack_codes(stored, n).reshape(rows, -1)
    else:
        codes = stored.astype(np.int64) + code_offset(len(codebook))
    t = cb[codes].reshape(codes.shape[0], -1)
    return t.T.copy() if rows_of == "transpose" else t.reshape(layer_shape)
