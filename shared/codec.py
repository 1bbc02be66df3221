"""Adapter payloads on the wire, both directions: the codecs, their strict decoding, and error feedback.

Run config ``update-codec`` says how a device's train reply travels, ``downlink-codec`` how the
server's adapter does (docs/communication.md). Both sides decode with the same functions here.

| codec      | arrays per tensor ``K`` (plain numpy, never pickled)                  | up: what it carries | lossless |
|------------|-----------------------------------------------------------------------|---------------------|----------|
| `float32`  | ``K`` float32                                                         | the adapter itself  | yes      |
| `float16`  | ``K`` float16                                                         | the change          | no       |
| `bfloat16` | ``K`` uint16: the upper half of each float32, rounded to nearest even | the change          | no       |
| `int8`     | ``K/int8`` int8 in [-127, 127], ``K/scale`` float32, one per row      | the change          | no       |
| `topk`     | ``K/values`` float32, ``K/indices`` uint16/uint32 (flat, increasing)  | the change          | no       |

Under ``float32`` a reply is the trained adapter, exactly as it was before any codec existed. Under
every other codec a reply carries the adapter's change from what its device received, which the
server adds to the adapter it meant to send: a change is small, so a code's error is small beside
the adapter, and a lossy downlink never leaks into the server's own state. The server sends whole
adapters (``float32``, ``float16``, ``bfloat16`` or ``int8``; a sparse code carries only a change).

int8 is symmetric per row (a tensor's first axis): scale = max |row| / 127, so each decoded value is
within scale / 2 of the encoded one. top-k keeps, per tensor, the ``topk_count`` entries of largest
magnitude; ``ErrorFeedback`` adds what a round's code dropped to the next round's change before
selecting (Stich et al., 2018, https://arxiv.org/abs/1809.07599; Karimireddy et al., 2019,
https://arxiv.org/abs/1901.09847), so nothing a device learns is lost, only delayed.

``decode`` trusts nothing: the exact keys, dtypes and shapes the codec and the expected shapes
imply, top-k indices in range and strictly increasing, scales finite and >= 0, and a finite result.
Anything else raises AdapterUpdateError, which the server records as a rejected update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
from flwr.app import Array, ArrayRecord

INT8_LIMIT = 127  # symmetric: -128 is never written, and refused when read
QUANTIZED, SCALE, VALUES, INDICES = "int8", "scale", "values", "indices"


class AdapterUpdateError(ValueError):
    """An adapter update is malformed or hostile: wrong keys or shapes, non-finite, or too large."""


class UpdateCodec(Enum):
    """How an adapter payload is coded on the wire (run config ``update-codec``, ``downlink-codec``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"
    TOPK = "topk"

    @property
    def lossless(self) -> bool:
        return self is UpdateCodec.FLOAT32

    @property
    def sparse(self) -> bool:
        """Whether the code drops entries: it carries a change only, and the device keeps what it dropped."""
        return self is UpdateCodec.TOPK

    @property
    def parts(self) -> tuple[str, ...]:
        """The arrays a tensor ``K`` travels as: ``K/<part>`` each, or ``K`` itself for ``("",)``."""
        if self is UpdateCodec.INT8:
            return (QUANTIZED, SCALE)
        return (VALUES, INDICES) if self.sparse else ("",)


UPDATE_CODECS = tuple(codec.value for codec in UpdateCodec)
DOWNLINK_CODECS = tuple(codec.value for codec in UpdateCodec if not codec.sparse)


@dataclass(frozen=True)
class Codecs:
    """The run's codecs: ``up`` for train replies, ``down`` for what the server sends, and top-k's fraction."""

    up: UpdateCodec = UpdateCodec.FLOAT32
    down: UpdateCodec = UpdateCodec.FLOAT32
    topk_fraction: float = 0.1

    @property
    def plain(self) -> bool:
        """Both directions carry the float32 adapter itself (nothing to encode or decode)."""
        return self.up.lossless and self.down.lossless


def wire_key(key: str, part: str) -> str:
    return f"{key}/{part}" if part else key


def topk_count(size: int, fraction: float) -> int:
    """How many entries top-k keeps of a tensor of ``size`` entries: ceil(fraction x size), at least 1."""
    return min(size, max(1, math.ceil(fraction * size)))


def index_dtype(size: int) -> np.dtype:
    """The narrowest unsigned type holding every flat index of a tensor of ``size`` entries."""
    return np.dtype(np.uint16) if size <= 2**16 else np.dtype(np.uint32)


# --- encoding --------------------------------------------------------------------------------------


def encode(tensors: Mapping[str, np.ndarray], codec: UpdateCodec, topk_fraction: float = 0.1) -> ArrayRecord:
    """``tensors`` (finite floats) as the arrays ``codec`` sends; ValueError for what it cannot carry."""
    record = ArrayRecord()
    for key, tensor in tensors.items():
        values = np.asarray(tensor, np.float32)
        if not np.isfinite(values).all():
            raise ValueError(f"{key}: NaN or inf cannot be encoded")
        for part, array in _encode_tensor(values, codec, topk_fraction).items():
            record[wire_key(key, part)] = Array(np.ascontiguousarray(array))
    return record


def _encode_tensor(values: np.ndarray, codec: UpdateCodec, topk_fraction: float) -> dict[str, np.ndarray]:
    if codec is UpdateCodec.FLOAT32:
        return {"": values}
    if codec is UpdateCodec.FLOAT16:
        with np.errstate(over="ignore"):
            half = values.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"a value of magnitude {np.abs(values).max():.4g} overflows float16 (largest 65504)")
        return {"": half}
    if codec is UpdateCodec.BFLOAT16:
        return {"": _to_bfloat16_bits(values)}
    if codec is UpdateCodec.INT8:
        return _quantize_rows(values)
    return _top_k(values, topk_count(values.size, topk_fraction))


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of each float32, rounded to nearest even (what torch's bfloat16 cast does)."""
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    if ((rounded & 0x7F80) == 0x7F80).any():  # the exponent rounded up to all ones: inf
        raise ValueError(f"a value of magnitude {np.abs(values).max():.4g} overflows bfloat16")
    return rounded.astype(np.uint16)


def _rows(values: np.ndarray) -> np.ndarray:
    """A tensor as (rows, rest): its first axis is the row (a scalar is one row of one)."""
    return values.reshape(values.shape[0] if values.ndim else 1, -1)


def _quantize_rows(values: np.ndarray) -> dict[str, np.ndarray]:
    rows = _rows(values).astype(np.float64)
    scale = (np.abs(rows).max(axis=1) / INT8_LIMIT if rows.size else np.zeros(len(rows))).astype(np.float32)
    # rounded with the float32 scale the receiver multiplies by: |x - q x scale| <= scale / 2 holds for it
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float64)[:, None]
    quantized = np.clip(np.rint(rows / divisor), -INT8_LIMIT, INT8_LIMIT).astype(np.int8)
    return {QUANTIZED: quantized.reshape(values.shape), SCALE: scale}


def _top_k(values: np.ndarray, k: int) -> dict[str, np.ndarray]:
    flat = values.reshape(-1)
    chosen = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k]) if flat.size else np.zeros(0, np.int64)
    return {VALUES: flat[chosen].astype(np.float32), INDICES: chosen.astype(index_dtype(flat.size))}


# --- decoding --------------------------------------------------------------------------------------


def decode(arrays: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], codec: UpdateCodec,
           topk_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The float32 tensors a payload stands for, checked against the expected keys and shapes.

    Raises AdapterUpdateError naming the first problem (see the module's last paragraph).
    """
    expected = {wire_key(key, part) for key in shapes for part in codec.parts}
    missing, unexpected = sorted(expected - set(arrays.keys())), sorted(set(arrays.keys()) - expected)
    if missing or unexpected:
        raise AdapterUpdateError(f"{codec.value} payload keys differ: missing {missing[:3]}"
                                 f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                                 f"{'...' if len(unexpected) > 3 else ''}")
    result: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        parts = {part: _plain(arrays, wire_key(key, part)) for part in codec.parts}
        with np.errstate(over="ignore", invalid="ignore"):
            values = _decode_tensor(key, parts, tuple(shape), codec, topk_fraction)
        if not np.isfinite(values).all():
            raise AdapterUpdateError(f"{key}: decodes to NaN or inf")
        result[key] = values
    return result


def _plain(arrays: ArrayRecord, key: str) -> np.ndarray:
    try:
        return arrays[key].numpy()  # np.load(allow_pickle=False): object arrays are refused
    except (TypeError, ValueError) as error:
        raise AdapterUpdateError(f"{key}: not a plain numpy array ({error})") from error


def _require(key: str, array: np.ndarray, dtype: np.dtype | type, shape: tuple[int, ...]) -> None:
    if array.dtype != np.dtype(dtype):
        raise AdapterUpdateError(f"{key}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if tuple(array.shape) != shape:
        raise AdapterUpdateError(f"{key}: shape {tuple(array.shape)}, expected {shape}")


def _decode_tensor(key: str, parts: dict[str, np.ndarray], shape: tuple[int, ...], codec: UpdateCodec,
                   topk_fraction: float) -> np.ndarray:
    if codec in (UpdateCodec.FLOAT32, UpdateCodec.FLOAT16):
        _require(key, parts[""], np.float32 if codec is UpdateCodec.FLOAT32 else np.float16, shape)
        return parts[""].astype(np.float32)
    if codec is UpdateCodec.BFLOAT16:
        _require(key, parts[""], np.uint16, shape)
        return (parts[""].astype(np.uint32) << 16).view(np.float32)
    if codec is UpdateCodec.INT8:
        return _dequantize_rows(key, parts[QUANTIZED], parts[SCALE], shape)
    return _scatter(key, parts[VALUES], parts[INDICES], shape, topk_fraction)


def _dequantize_rows(key: str, quantized: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    _require(wire_key(key, QUANTIZED), quantized, np.int8, shape)
    rows = _rows(quantized)
    _require(wire_key(key, SCALE), scale, np.float32, (len(rows),))
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise AdapterUpdateError(f"{wire_key(key, SCALE)}: scales must be finite and >= 0")
    if (quantized == -INT8_LIMIT - 1).any():
        raise AdapterUpdateError(f"{wire_key(key, QUANTIZED)}: -128 is outside the symmetric code")
    return (rows.astype(np.float32) * scale[:, None]).reshape(shape)


def _scatter(key: str, values: np.ndarray, indices: np.ndarray, shape: tuple[int, ...], topk_fraction: float) -> np.ndarray:
    size = math.prod(shape)
    k = topk_count(size, topk_fraction)
    _require(wire_key(key, VALUES), values, np.float32, (k,))
    _require(wire_key(key, INDICES), indices, index_dtype(size), (k,))
    wide = indices.astype(np.int64)
    if k and (wide[-1] >= size or (np.diff(wide) <= 0).any()):
        raise AdapterUpdateError(f"{wire_key(key, INDICES)}: indices must be strictly increasing and below {size}")
    dense = np.zeros(size, np.float32)
    dense[wide] = values
    return dense.reshape(shape)


# --- applying a change, and error feedback ---------------------------------------------------------


def apply_change(start: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``start + change`` key by key, in float32; AdapterUpdateError where the sum is not finite."""
    result: dict[str, np.ndarray] = {}
    for key, delta in change.items():
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.asarray(start[key], np.float32) + delta
        if not np.isfinite(value).all():
            raise AdapterUpdateError(f"{key}: the adapter plus the change overflows float32")
        result[key] = value
    return result


class ErrorFeedback:
    """A device's residual: what its previous codes dropped, added to the next change before it is encoded.

    ``encode`` returns the payload and keeps ``corrected - decoded(payload)`` as the new residual, so
    what was sent plus the residual always sums to everything the device has learned since it started
    sending. A residual whose keys or shapes do not match the change (another adapter configuration)
    is not used.
    """

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual = {key: np.asarray(value, np.float32) for key, value in (residual or {}).items()}

    def encode(self, change: Mapping[str, np.ndarray], codec: UpdateCodec, topk_fraction: float) -> ArrayRecord:
        shapes = {key: tuple(np.shape(value)) for key, value in change.items()}
        matches = {key: tuple(value.shape) for key, value in self.residual.items()} == shapes
        corrected = {key: np.asarray(value, np.float32) + (self.residual[key] if matches else 0)
                     for key, value in change.items()}
        payload = encode(corrected, codec, topk_fraction)
        sent = decode(payload, shapes, codec, topk_fraction)
        self.residual = {key: corrected[key] - sent[key] for key in corrected}
        return payload
