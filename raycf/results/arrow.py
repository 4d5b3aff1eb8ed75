"""Vectors and masks as Parquet columns: plain ``fixed_size_list`` arrays, readable without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def vector_column(matrix: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<dtype>[width]`` column from an N×width (or N×a×b: nested) array."""
    matrix = np.asarray(matrix)
    if matrix.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=dtype), matrix.shape[1])
    inner = vector_column(matrix.reshape(-1, *matrix.shape[2:]), dtype)
    return pa.FixedSizeListArray.from_arrays(inner, matrix.shape[1])


def column_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A Parquet column as numpy: scalars as 1-D, (nested) fixed-size lists as N×… arrays."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # zero-copy views are read-only; torch warns on those
        values = values.copy()
    return values.reshape(shape) if len(shape) > 1 else values


def table_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column of ``table`` through :func:`column_array`."""
    return {name: column_array(table.column(name)) for name in table.column_names}
