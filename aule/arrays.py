"""Moving data between the caller's array type and NumPy, without needless copies."""
from __future__ import annotations

import numpy as np

from .call import is_torch_tensor


def to_numpy(x, allow_half: bool = True) -> np.ndarray:
    """A C-contiguous NumPy view or copy of ``x``. bfloat16 becomes float32 (NumPy has no bf16)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    if is_torch_tensor(x):
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16 or (t.dtype == torch.float16 and not allow_half):
            t = t.float()
        return np.ascontiguousarray(t.cpu().numpy())
    raise TypeError(f"expected a NumPy array or torch tensor, got {type(x).__name__}")


def like(result: np.ndarray, ref):
    """Return ``result`` as the type, device and dtype of ``ref`` (a NumPy array or torch tensor)."""
    if isinstance(ref, np.ndarray):
        return result.astype(ref.dtype, copy=False)
    import torch

    return torch.from_numpy(np.ascontiguousarray(result)).to(device=ref.device, dtype=ref.dtype)


def lse_like(lse: np.ndarray, ref):
    """LSE is float32 for the caller (float64 stays float64 for NumPy float64 inputs)."""
    if isinstance(ref, np.ndarray):
        return lse.astype(np.float64 if ref.dtype == np.float64 else np.float32, copy=False)
    import torch

    return torch.from_numpy(np.ascontiguousarray(lse, dtype=np.float32)).to(device=ref.device)
