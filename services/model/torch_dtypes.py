"""The torch dtype of each name in `services.contract.dtypes`: the one mapping the torch side uses."""

from __future__ import annotations

import torch

from services.contract.dtypes import DTYPE_NAMES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
