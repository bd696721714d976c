"""How codes are stored, in numpy: int8 codes with an offset, 4-bit codes two a byte, 6-bit
codes four in three bytes and 5-bit codes six in four bytes.

TensorRT's ONNX parser (8.x) has no UINT8 tensors and Casts only between FP32/FP16/INT32/INT8/
BOOL, and it lacks BitShift; so codes are int8 ``code − offset`` (offset 128 when K > 128),
4-bit codes are packed as byte = 16·hi + lo − 128 and 6-bit codes as the three bytes of the
24-bit word u = 2¹⁸·p₀ + 2¹²·p₁ + 2⁶·p₂ + p₃ (each byte − 128), 5-bit codes likewise as the
four bytes of the 30-bit word u = Σ_j 2^(5·(5−j))·p_j, unpacked with integer
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
    ``pack_words`` (5: six in four bytes, 6: four in three bytes), else one byte a code."""
    if bits in WORDS:
        c, nbytes = WORDS[bits]
        return nbytes * ((n + c - 1) // c)
    return (n + 1) // 2 if bits == 4 else n


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


# packed widths other than 4: (codes a word, bytes a word); a word of c·b bits (at most 31: int32
# arithmetic in the decode) holds c codes, most significant first, and is stored as its bytes
WORDS = {5: (6, 4), 6: (4, 3)}


def word_places(bits: int) -> tuple:
    """(the codes' places in a word, c × 1; the bytes' places, nbytes × 1), int64."""
    c, nbytes = WORDS[bits]
    codes = np.array([[1 << (bits * (c - 1 - i))] for i in range(c)], dtype=np.int64)
    return codes, np.array([[1 << (8 * (nbytes - 1 - j))] for j in range(nbytes)], dtype=np.int64)


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit codes (``WORDS``: 5 — six in four bytes, 6 — four in three bytes) as int8 of
    shape (nbytes, g), g = ⌈n/c⌉: the n codes in row-major order (padded with 0s to c·g) are cut
    in c parts p₀…p_{c−1} (as ``pack_codes`` cuts halves), u_i = Σ_j 2^(b·(c−1−j))·p_jᵢ and row j
    holds byte j of u (most significant first) − 128."""
    c, nbytes = WORDS[bits]
    flat = codes.reshape(-1).astype(np.int64)
    if flat.size and flat.max() >= 1 << bits:
        raise ValueError(f"{bits}-bit codes must be < {1 << bits}")
    if flat.size <= 2 * c + 1:   # nbytes·⌈n/c⌉ could be n: the stored shape could not tell them from a byte a code
        raise ValueError(f"{bits}-bit packing needs more than {2 * c + 1} codes")
    g = (flat.size + c - 1) // c
    parts = np.zeros(c * g, dtype=np.int64)
    parts[:flat.size] = flat
    u = parts.reshape(c, g).T @ word_places(bits)[0][:, 0]
    return (np.stack([(u >> (8 * (nbytes - 1 - j))) & 255 for j in range(nbytes)]) - 128).astype(np.int8)


def pack_codes6(codes: np.ndarray) -> np.ndarray:
    """6-bit codes (0..63) four in three bytes, as int8 of shape (3, g), g = ⌈n/4⌉: the n codes in
    row-major order (padded with 0s to 4g) are cut in quarters p₀…p₃ (as ``pack_codes`` cuts
    halves), u_i = 2¹⁸·p₀ᵢ + 2¹²·p₁ᵢ + 2⁶·p₂ᵢ + p₃ᵢ (24 bits) and row j holds byte j of u
    (most significant first) − 128 (``pack_words``)."""
    return pack_words(codes, 6)


SIX_BIT_PLACES, SIX_BIT_BYTES = word_places(6)   # the quarters' places in u, the bytes' places in u


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The n codes ``pack_codes`` (1-D: 4-bit) or ``pack_words`` (2-D: nbytes rows, 5- or 6-bit)
    stored (int64), in numpy: what the decode subgraph computes."""
    v = packed.astype(np.int64) + 128
    if v.ndim == 2:
        bits = next(b for b, (_, nbytes) in WORDS.items() if nbytes == len(v))
        places, byte_places = word_places(bits)
        u = (v * byte_places).sum(0, keepdims=True)          # (1, g)
        q = u // places                                      # (c, g)
        return (q - (1 << bits) * (q >> bits)).reshape(-1)[:n]
    hi = v // 16
    return np.concatenate([hi, v - 16 * hi])[:n]


def code_bits(stored: np.ndarray, n: int) -> int:
    """The code width of stored codes for n codes: 4 (1-D, ``pack_codes``), 6 (3 × ⌈n/4⌉) or 5
    (4 × ⌈n/6⌉, ``pack_words``), else 8 (rows × sub-vectors, a byte a code)."""
    if stored.ndim == 1:
        return 4
    if stored.size == n:   # a byte a code: n bytes; packed: nbytes·⌈n/c⌉ ≠ n (``pack_words``)
        return 8
    return next(b for b, (_, nbytes) in WORDS.items() if nbytes == stored.shape[0])


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
