"""The statistics request of the hadamard pass: raw calibration rows of a layer.

The Fastfood fit is not a function of the second moments of a layer's input (the diagonals enter
the error through the Hadamard transforms of each row), so, unlike the refits of the other passes,
it keeps up to ``max_rows`` rows of the layer's input and of its target output.
"""

from __future__ import annotations

import numpy as np


class RowSample:
    """Calibration request: up to ``max_rows`` rows of a layer's input (from the rewritten model)
    and its target output (from the reference), kept in float32: memory max_rows·(d_in+d_out)·4 B."""

    def __init__(self, key, x_tensor, y_tensor, per_batch, max_rows):
        self.key, self.x_tensor, self.y_tensor = key, x_tensor, y_tensor
        self.per_batch, self.max_rows = per_batch, max_rows

    def tensors(self):
        return {"x": [self.x_tensor], "y": [self.y_tensor]}

    def new(self, xa, ya):
        return {"x": [], "y": [], "n": 0}

    def update(self, acc, xa, ya, rng):
        x = xa[self.x_tensor].reshape(-1, xa[self.x_tensor].shape[-1])
        y = ya[self.y_tensor].reshape(-1, ya[self.y_tensor].shape[-1])
        take = min(self.per_batch, self.max_rows - acc["n"], len(x))
        if take <= 0:
            return
        sel = np.arange(len(x)) if take >= len(x) else np.sort(rng.choice(len(x), take, replace=False))
        acc["x"].append(x[sel].astype(np.float32))
        acc["y"].append(y[sel].astype(np.float32))
        acc["n"] += len(sel)
