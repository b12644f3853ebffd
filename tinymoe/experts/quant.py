"""The byte rule of expert storage: one SwiGLU expert copy is gate and up as one [2I, D] matrix
and down as [D, I], each in a format of `kernels/quant.py` ("full": the model's dtype). The
pools' `copy_bytes`, `Experts.weight_bytes` and R&Q's budget all count with `expert_bytes`."""
from ..kernels.quant import INT4_GROUP, matrix_bytes


def expert_bytes(hidden: int, inter: int, precision: str, full_itemsize: int, group: int = INT4_GROUP) -> int:
    """Bytes of one expert copy in `precision` (scales and zeros included); `full_itemsize` is the
    unquantised dtype's, `group` the int4 group the experts are stored with."""
    return matrix_bytes(2 * inter, hidden, precision, full_itemsize, group) + \
        matrix_bytes(hidden, inter, precision, full_itemsize, group)
