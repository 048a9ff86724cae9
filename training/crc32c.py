"""CRC-32C (Castagnoli), the checksum of TFRecords (`tensorboard.py`), without a compiled package.

A byte-at-a-time table loop costs about 0.1 µs a byte in Python: nothing for a step's scalars, 0.2 s for a 10 s demo
WAV and seconds when `sa3-lora runs tensorboard` rebuilds a run's demos. Long inputs are therefore split into
N_CHUNKS equal chunks whose CRC registers advance together, one numpy table lookup per byte position for all of
them, and then combined: the register is linear over GF(2), so the CRC of `a || b` is the register of `a` carried
through len(b) zero bytes (a fixed 32x32 bit matrix, applied through four 256-entry byte tables) XOR the register of
`b` started at zero: 0.012 s for that 10 s WAV (bench/tfrecord_crc.py). Same value as the loop (tested on lengths
around every chunk boundary).
"""

from __future__ import annotations

import numpy as np

POLY = 0x82F63B78  # reflected Castagnoli polynomial
N_CHUNKS = 4096  # registers advanced together; a power of two so the chunks pair up level by level
CHUNKED_FROM = 1 << 15  # bytes; chunked wins from ~24 KB (bench/tfrecord_crc.py: 2.4 ms against 3.4 ms at 32 KB)


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


BYTE_TABLE = _byte_table()
_BYTE_TABLE_NP = np.array(BYTE_TABLE, dtype=np.uint32)


def advance_register(data: memoryview | bytes, register: int = 0) -> int:
    """The CRC register after feeding data's bytes one at a time from `register` (no final XOR)."""
    table = BYTE_TABLE
    for b in data:
        register = table[(register ^ b) & 0xFF] ^ (register >> 8)
    return register


def _matrix_times(columns: list[int], value: int) -> int:
    """A GF(2) 32x32 matrix, given as its 32 column images, times a 32-bit value."""
    out, bit = 0, 0
    while value:
        if value & 1:
            out ^= columns[bit]
        value >>= 1
        bit += 1
    return out


def _matrix_product(left: list[int], right: list[int]) -> list[int]:
    return [_matrix_times(left, column) for column in right]


def _zero_bytes_matrix(count: int) -> list[int]:
    """Columns of the map 'carry a register through `count` zero bytes' (square and multiply from one byte)."""
    one_byte = [BYTE_TABLE[(1 << bit) & 0xFF] ^ ((1 << bit) >> 8) for bit in range(32)]
    result = [1 << bit for bit in range(32)]  # identity
    while count:
        if count & 1:
            result = _matrix_product(one_byte, result)
        one_byte = _matrix_product(one_byte, one_byte)
        count >>= 1
    return result


def _byte_tables(columns: list[int]) -> np.ndarray:
    """[4, 256] uint32: the matrix applied to each byte value in each byte position, so a whole array of registers
    maps with four lookups. A byte's image is the XOR of its set bits' columns: built by doubling."""
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k, 1 << bit:2 << bit] = tables[k, :1 << bit] ^ np.uint32(columns[8 * k + bit])
    return tables


def _map_registers(tables: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """registers [K] uint32 through the matrix of `tables` [4, 256] (`_byte_tables`) -> [K] uint32."""
    return (tables[0][registers & 0xFF] ^ tables[1][(registers >> 8) & 0xFF]
            ^ tables[2][(registers >> 16) & 0xFF] ^ tables[3][registers >> 24])


def advance_register_chunked(data: memoryview | bytes, register: int = 0) -> int:
    """advance_register's result for long data (C-contiguous bytes): N_CHUNKS chunks advanced together, then
    folded pairwise, each fold carrying the left register through the right chunk's length."""
    view = memoryview(data).cast("B")
    head = len(view) % N_CHUNKS
    register = advance_register(view[:head], register)
    body = np.frombuffer(view[head:], dtype=np.uint8).reshape(N_CHUNKS, -1)
    registers = np.zeros(N_CHUNKS, dtype=np.uint32)
    for column in body.T:  # one byte position of every chunk
        registers = _BYTE_TABLE_NP[(registers ^ column) & 0xFF] ^ (registers >> 8)
    carry = _zero_bytes_matrix(body.shape[1])  # through one chunk; doubles with each fold
    while len(registers) > 1:
        registers = _map_registers(_byte_tables(carry), registers[0::2]) ^ registers[1::2]
        carry = _matrix_product(carry, carry)
    return _matrix_times(carry, register) ^ int(registers[0])  # the head's register carried through the body


def as_bytes(data) -> memoryview:
    """A flat byte view of any bytes-like object (bytes, bytearray, numpy arrays, strided or typed memoryviews)."""
    view = memoryview(data)
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object's bytes (initial register and final XOR 0xFFFFFFFF)."""
    view = as_bytes(data)
    advance = advance_register_chunked if view.nbytes >= CHUNKED_FROM else advance_register
    return advance(view, 0xFFFFFFFF) ^ 0xFFFFFFFF


__all__ = ["N_CHUNKS", "CHUNKED_FROM", "advance_register", "advance_register_chunked", "as_bytes", "crc32c"]
