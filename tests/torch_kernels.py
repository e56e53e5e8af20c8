"""Recording which torch kernels a thread runs (each service keeps its kernels on one thread: see
services.runtime.own_thread)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class Kernels(TorchDispatchMode):
    """Records the torch operations run in this thread (dispatch modes are thread-local) that are more than a view
    (a kernel doing work)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
