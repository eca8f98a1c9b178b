"""The learned-eviction weight file (KVSLRN01), written by the trainers and read by src/kv/learned.c.

Layout (little-endian, no padding; the C loader's header comment is the reference):
    0   char  magic[8]      "KVSLRN01"
    8   u32   version       1
    12  u32   method        1 = locret retaining heads
    16  u64   fingerprint   kvs_model_fingerprint of the GGUF it was trained on (`kvsieve info`)
    24  u32   n_layer, n_head, n_head_kv, head_dim
    40  u32   hidden        width of the head's hidden layer
    44  u32   act           1 = SiLU
    48  u32   labels        1 = question+answer attention (Locret), 2 = context-repeat attention (KVzip)
    52  u32   n_train       prompts trained on
    56  char  name[64]      free text (model name), NUL padded
    120 u32   reserved[2]   0
    128 per layer:  fc1 weight fp16 [hidden][in], fc1 bias fp16 [hidden], fc2 weight fp16 [n_head_kv][hidden]
                    where in = (n_head + 2 n_head_kv) head_dim: the layer's q, k, v projections (bias added,
                    before RoPE) in the GGUF's channel order, concatenated
    end u64   xxh64 (seed 0) of every byte before it
"""

import struct

MAGIC = b"KVSLRN01"
HEADER = 128
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                      0x27D4EB2F165667C5)
M64 = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _round(acc, lane):
    acc = (acc + lane * P2) & M64
    return (_rotl(acc, 31) * P1) & M64


def _merge(acc, v):
    acc ^= _round(0, v)
    return (acc * P1 + P4) & M64


def xxh64(data, seed=0):
    """XXH64 of bytes (the algorithm's public specification; pure Python)."""
    n, i = len(data), 0
    if n >= 32:
        v1, v2, v3, v4 = (seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64
        lanes = struct.unpack_from("<%dQ" % ((n // 32) * 4), data, 0)
        for j in range(0, len(lanes), 4):
            v1 = _round(v1, lanes[j])
            v2 = _round(v2, lanes[j + 1])
            v3 = _round(v3, lanes[j + 2])
            v4 = _round(v4, lanes[j + 3])
        i = (n // 32) * 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & M64
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        (k,) = struct.unpack_from("<Q", data, i)
        h ^= _round(0, k)
        h = (_rotl(h, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        (k,) = struct.unpack_from("<I", data, i)
        h ^= (k * P1) & M64
        h = (_rotl(h, 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h ^= (data[i] * P5) & M64
        h = (_rotl(h, 11) * P1) & M64
        i += 1
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    h ^= h >> 32
    return h


def write(path, fingerprint, n_layer, n_head, n_kv, head_dim, hidden, labels, n_train, name, layers):
    """layers: per layer (w1 [hidden][in], b1 [hidden], w2 [n_kv][hidden]) as float16 numpy arrays."""
    import numpy as np
    hdr = bytearray(HEADER)
    struct.pack_into("<8sIIQIIIIIIII", hdr, 0, MAGIC, 1, 1, fingerprint, n_layer, n_head, n_kv, head_dim,
                     hidden, 1, labels, n_train)
    nb = name.encode()[:63]
    hdr[56:56 + len(nb)] = nb
    body = bytearray(hdr)
    d_in = (n_head + 2 * n_kv) * head_dim
    for w1, b1, w2 in layers:
        assert w1.shape == (hidden, d_in) and b1.shape == (hidden,) and w2.shape == (n_kv, hidden)
        for a in (w1, b1, w2):
            a = np.ascontiguousarray(a, dtype="<f2")
            if not np.isfinite(a).all():
                raise ValueError("weights overflow float16")
            body += a.tobytes()
    body += struct.pack("<Q", xxh64(bytes(body)))
    with open(path + ".tmp", "wb") as f:
        f.write(body)
    import os
    os.replace(path + ".tmp", path)
    return len(body)
