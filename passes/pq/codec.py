"""How codes are stored, in numpy: int8 codes with an offset, 4-bit codes two a byte and 6-bit
codes four in three bytes.

TensorRT's ONNX parser (8.x) has no UINT8 tensors and Casts only between FP32/FP16/INT32/INT8/
BOOL, and it lacks BitShift; so codes are int8 ``code − offset`` (offset 128 when K > 128),
4-bit codes are packed as byte = 16·hi + lo − 128 and 6-bit codes as the three bytes of the
24-bit word u = 2¹⁸·p₀ + 2¹²·p₁ + 2⁶·p₂ + p₃ (each byte − 128), unpacked with integer
Mul/ReduceSum/Div/Sub (see ``edits.decode``, which builds the same computation as graph nodes).
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


def code_bytes(n: int, bits: int) -> int:
    """The bytes ``n`` codes are stored in at ``bits`` a code: ``pack_codes`` (4: two a byte),
    ``pack_codes6`` (6: four in three bytes), else one byte a code."""
    return {4: (n + 1) // 2, 6: 3 * ((n + 3) // 4)}.get(bits, n)


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


def pack_codes6(codes: np.ndarray) -> np.ndarray:
    """6-bit codes (0..63) four in three bytes, as int8 of shape (3, g), g = ⌈n/4⌉: the n codes in
    row-major order (padded with 0s to 4g) are cut in quarters p₀…p₃ (as ``pack_codes`` cuts
    halves), u_i = 2¹⁸·p₀ᵢ + 2¹²·p₁ᵢ + 2⁶·p₂ᵢ + p₃ᵢ (24 bits) and row j holds byte j of u
    (most significant first) − 128."""
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and flat.max() > 63:
        raise ValueError("6-bit codes must be < 64")
    if flat.size <= 9:   # 3·⌈n/4⌉ = n: the stored shape could not tell them from a byte a code
        raise ValueError("6-bit packing needs more than 9 codes")
    g = (flat.size + 3) // 4
    parts = np.zeros(4 * g, dtype=np.int64)
    parts[:flat.size] = flat
    u = parts.reshape(4, g).T @ SIX_BIT_PLACES[:, 0]
    return (np.stack([u >> 16, (u >> 8) & 255, u & 255]) - 128).astype(np.int8)


SIX_BIT_PLACES = np.array([[1 << 18], [1 << 12], [1 << 6], [1]], dtype=np.int64)   # the quarters' places in u
SIX_BIT_BYTES = np.array([[1 << 16], [1 << 8], [1]], dtype=np.int64)              # the bytes' places in u


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The n codes ``pack_codes`` (1-D: 4-bit) or ``pack_codes6`` (2-D: 6-bit) stored (int64),
    in numpy: what the decode subgraph computes."""
    v = packed.astype(np.int64) + 128
    if v.ndim == 2:
        u = (v * SIX_BIT_BYTES).sum(0, keepdims=True)      # (1, g)
        q = u // SIX_BIT_PLACES                              # (4, g)
        return (q - 64 * (q // 64)).reshape(-1)[:n]
    hi = v // 16
    return np.concatenate([hi, v - 16 * hi])[:n]


def code_bits(stored: np.ndarray, n: int) -> int:
    """The code width of stored codes for n codes: 4 (1-D, ``pack_codes``), 6 (3 × ⌈n/4⌉,
    ``pack_codes6``), else 8 (rows × sub-vectors, a byte a code)."""
    if stored.ndim == 1:
        return 4
    return 6 if stored.size != n else 8   # a byte a code: n bytes; 6-bit: 3·⌈n/4⌉ ≠ n for n > 9


def decoded_weight(layer_shape, rows_of, codebook, stored) -> np.ndarray:
    """The weight the decode subgraph computes from the stored (int8) codes, in numpy; packed
    codes (``code_bits``: 4 or 6) are unpacked first, 2-D ones of a byte a code used as they are."""
    cb = codebook.astype(np.float32)
    n = int(np.prod(layer_shape)) // cb.shape[1]
    if code_bits(stored, n) < 8:
        rows = layer_shape[1] if rows_of == "transpose" else layer_shape[0]
        codes = unpack_codes(stored, n).reshape(rows, -1)
    else:
        codes = stored.astype(np.int64) + code_offset(len(codebook))
    t = cb[codes].reshape(codes.shape[0], -1)
    return t.T.copy() if rows_of == "transpose" else t.reshape(layer_shape)
