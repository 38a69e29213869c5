"""BrushData's run-length mask encoding, written for the tests independently of training/data.py's decoder."""


def brushdata_rle(m) -> list[int]:
    """[H, W] 0/1 array -> [start (1-based), length, ...] over the column-major flattening (BrushData's layout)."""
    flat, runs, j = m.flatten(order="F"), [], 0
    while j < len(flat):
        if flat[j]:
            k = j
            while k < len(flat) and flat[k]:
                k += 1
            runs += [j + 1, k - j]
            j = k
        else:
            j += 1
    return runs
