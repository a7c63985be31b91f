"""oneDNN's linear products on CPU, where torch was built with them (packed base linears, the torch delta path)."""

from __future__ import annotations

import torch


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
