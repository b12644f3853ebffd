"""The quantised weight formats: their one definition, which every kernel (native, Triton, the
torch twins), the loader and the checkpoint writer read. A weight matrix is [N, K]: N output
channels, K inputs (as `F.linear` takes it); formats may carry leading dimensions ([E, N, K]
for stacked experts).

- int8: `q` int8 [..., N, K], `scales` bf16 [..., N]: w = q * scale, symmetric per output
  channel (q in -127..127).
- int4: `q` uint8 [..., N, KP / 2], KP = K rounded up to a multiple of `group`, zero-padded;
  byte j of a row holds input 2j in its low nibble and 2j + 1 in its high nibble.
  `scales` bf16 [..., N, KP / group, 2] = (scale, zero): w = (q - 8) * scale + zero, asymmetric
  per (channel, group of `group` inputs), q in 0..15; zero is the value of q = 8 (mid-range, so
  it is stored more exactly than the group's minimum would be).

Neither depends on the CPU, so a quantised checkpoint written on one machine loads on any other.
Scales are rounded up to bf16 so that the extreme values never clip. `QWeight` is one quantised
matrix (or stack) with its format; `quantize` / `dequantize` are the reference conversions.
"""
from typing import NamedTuple

import torch

QUANT_PRECISIONS = ("int8", "int4")
INT4_GROUPS = (32, 64, 128)
INT4_GROUP = 64  # the default group (docs/quantization.md: the measured choice)
SCALE_BYTES = 2  # bf16


class QWeight(NamedTuple):
    """A quantised [..., N, K] weight: `precision` "int8" or "int4", its codes `q` and `scales`
    in the layout above, `group` (int4; 0 for int8) and the unpadded input count `cols` (K)."""
    precision: str
    q: torch.Tensor
    scales: torch.Tensor
    group: int
    cols: int

    @property
    def rows(self) -> int:
        return self.q.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-1], self.cols)

    @property
    def padded_cols(self) -> int:
        """KP: the inputs the codes cover (int4 pads K to its group)."""
        return self.q.shape[-1] * (2 if self.precision == "int4" else 1)

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    def row(self, i) -> "QWeight":
        """Matrix i of a stack."""
        return QWeight(self.precision, self.q[i], self.scales[i], self.group, self.cols)

    def to(self, device) -> "QWeight":
        return self._replace(q=self.q.to(device), scales=self.scales.to(device))


def int4_group(cols: int, group: int = INT4_GROUP) -> int:
    """The int4 group for K = cols: `group`, halved down to 32 while it is larger than K rounded
    up to 32 (a tiny matrix need not be padded to a big group)."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group must be one of {', '.join(map(str, INT4_GROUPS))}, got {group!r}")
    padded = -(-cols // 32) * 32
    while group > 32 and group > padded:
        group //= 2
    return group


def padded_cols(cols: int, precision: str, group: int = INT4_GROUP) -> int:
    if precision != "int4":
        return cols
    g = int4_group(cols, group)
    return -(-cols // g) * g


def qweight_shapes(rows: int, cols: int, precision: str, group: int = INT4_GROUP) -> tuple[tuple, tuple, int]:
    """(codes shape, scales shape, group used) of a [rows, cols] matrix in `precision`."""
    if precision == "int8":
        return (rows, cols), (rows,), 0
    if precision == "int4":
        g, kp = int4_group(cols, group), padded_cols(cols, "int4", group)
        return (rows, kp // 2), (rows, kp // g, 2), g
    raise ValueError(f"unknown quantised precision {precision!r}; valid: {', '.join(QUANT_PRECISIONS)}")


def empty_qweight(rows: int, cols: int, precision: str, group: int = INT4_GROUP, device=None) -> QWeight:
    """An uninitialised QWeight of a [rows, cols] matrix (what loading fills in place)."""
    q_shape, s_shape, g = qweight_shapes(rows, cols, precision, group)
    q_dtype = torch.int8 if precision == "int8" else torch.uint8
    return QWeight(precision, torch.empty(q_shape, dtype=q_dtype, device=device),
                   torch.empty(s_shape, dtype=torch.bfloat16, device=device), g, cols)


def matrix_bytes(rows: int, cols: int, precision: str, full_itemsize: int, group: int = INT4_GROUP) -> int:
    """Bytes one [rows, cols] matrix takes in `precision` ("full": the model's dtype of
    `full_itemsize` bytes), scales and zeros included."""
    if precision == "full":
        return rows * cols * full_itemsize
    if precision == "int8":
        return rows * cols + rows * SCALE_BYTES
    if precision == "int4":
        kp = padded_cols(cols, "int4", group)
        return rows * kp // 2 + rows * (kp // int4_group(cols, group)) * 2 * SCALE_BYTES
    raise ValueError(f"unknown precision {precision!r}; valid: full, {', '.join(QUANT_PRECISIONS)}")


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    # bf16 rounds to nearest within 2^-9 relative; nudging up first keeps the stored scale at or
    # above the one needed, so the extreme values do not clip
    return (x * (1 + 2 ** -8)).to(torch.bfloat16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale bf16 [..., N])."""
    wf = w.float()
    scale = _round_up_bf16(wf.abs().amax(-1).clamp_min(1e-12) / 127)
    q = torch.round(wf / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (K a multiple of group) -> (codes uint8 [..., N, K] in 0..15, scales bf16
    [..., N, K / group, 2] = (scale, zero))."""
    *lead, n, k = w.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of the int4 group size {group}")
    wg = w.float().reshape(*lead, n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = _round_up_bf16((hi - lo).clamp_min(1e-12) / 15)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp_(0, 15).to(torch.uint8).reshape(*lead, n, k), torch.stack((scale, zero), -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., N, K] (K even) -> [..., N, K / 2]: inputs 2j and 2j + 1 in byte j's low
    and high nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    return torch.stack((packed & 15, packed >> 4), -1).flatten(-2)


def quantize(w: torch.Tensor, precision: str, group: int = INT4_GROUP) -> QWeight:
    """w [..., N, K] (any float dtype) -> its QWeight in `precision` ("int8" or "int4")."""
    cols = w.shape[-1]
    if precision == "int8":
        return QWeight("int8", *quantize_int8(w), 0, cols)
    if precision == "int4":
        g = int4_group(cols, group)
        kp = padded_cols(cols, "int4", group)
        wp = torch.nn.functional.pad(w, (0, kp - cols)) if kp != cols else w
        codes, scales = quantize_int4_codes(wp, g)
        return QWeight("int4", pack_int4(codes), scales, g, cols)
    raise ValueError(f"unknown quantised precision {precision!r}; valid: {', '.join(QUANT_PRECISIONS)}")


def dequantize(w: QWeight, dtype=torch.float32) -> torch.Tensor:
    """The [..., N, K] values a QWeight stands for (the reference every kernel is checked against)."""
    if w.precision == "int8":
        return (w.q.float() * w.scales.float()[..., None]).to(dtype)
    if w.precision == "int4":
        *lead, n, _ = w.q.shape
        codes = unpack_int4(w.q).float().reshape(*lead, n, -1, w.group)
        s = w.scales.float()
        values = (codes - 8) * s[..., :1] + s[..., 1:]
        return values.reshape(*lead, n, -1)[..., :w.cols].to(dtype)
    raise ValueError(f"unknown quantised precision {w.precision!r}; valid: {', '.join(QUANT_PRECISIONS)}")
