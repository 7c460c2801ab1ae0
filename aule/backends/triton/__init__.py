"""The Triton backends: FlashAttention forward and backward, paged attention and KV writes on CUDA
(``triton``) and ROCm (``triton-amd``). One set of kernels (:mod:`.kernels`, :mod:`.paged`); the
targets differ only by configuration (:mod:`.configs`). Importing this package imports neither
torch nor triton: the probe does, once, and the kernel modules load on first use.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from ...call import AttentionCall, OnDevice
from ..base import Backend, nothing_to_compute
from .common import MAX_HEAD_DIM, feature_table, interpreting

_DTYPES = ("float16", "bfloat16", "float32")
_MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third dimensions (heads, sequences)
_MAX_INT32 = 2 ** 31 - 1


class TritonBackend(Backend):
    """NVIDIA GPUs through a CUDA build of torch."""

    name = "triton"
    ops = ("attention", "paged_attention", "varlen_attention", "write_kv", "kv_store")
    differentiable = True
    # Compile-time flags of the dense kernels (forward and backward), sinks with their gradient;
    # the paged kernels apply softcap, ALiBi and sinks (forward only: paged attention has no backward).
    features = frozenset({"softcap", "alibi", "sinks", "mask", "general_mask", "fp8"})
    grad_features = frozenset({"sinks"})
    paged_features = frozenset({"softcap", "alibi", "sinks"})
    flavour = "cuda"  # torch.version.cuda / torch.version.hip: which build this backend needs
    # The paged kernels bounds-check the tables themselves (error flags, no read-back), and the dense
    # and varlen kernels the sinks, slopes and cu_seqlens a call left on the device (CHECK).
    checks_tables = True
    checks_values = True

    def _probe(self):
        reason = self._missing_packages()
        if reason:
            return reason
        import torch

        from .common import torch_gpu_flavour

        have = torch_gpu_flavour()
        if have is None:
            return f"torch {torch.__version__} is a CPU-only build: no CUDA or ROCm support"
        if have != self.flavour:
            other = "triton-amd" if have == "hip" else "triton"
            return (f"torch {torch.__version__} is a {have.upper()} build, this backend needs "
                    f"{self.flavour.upper()}: use backend={other!r}")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return f"no {'ROCm' if self.flavour == 'hip' else 'CUDA'} device is visible to torch"
        import triton  # noqa: F401  (a broken install must show up here, not mid-call)

        return None

    @staticmethod
    def _missing_packages() -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (pip install 'aule[torch]')"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'aule[torch]')"
        return None

    def why_not(self, op, call, forced):
        if op in self.ops and op != "attention" and interpreting():
            # Under TRITON_INTERPRET=1 the paged kernels run on CPU tensors with any torch build
            # (that is how they are tested without a GPU); dense attention keeps its device probe,
            # so a CPU machine never lists Triton as available.
            return (self._missing_packages() or self.missing_features(call)
                    or getattr(self, "why_not_" + op)(call, forced))
        return super().why_not(op, call, forced)

    # -- dense attention ------------------------------------------------------------------------
    def why_not_attention(self, call, forced):
        if call.kind != "torch":
            return f"it takes torch tensors on a GPU, got {call.kind} arrays"
        if call.descale is not None:
            return self._fp8_refusal(call)
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} is not supported (float16, bfloat16, float32)"
        if call.head_dim > MAX_HEAD_DIM:
            return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
        if call.device.startswith("cpu"):
            if interpreting():
                if call.dtype == "bfloat16":
                    return "bfloat16 cannot run under Triton's interpreter (its tl.dot miscomputes it)"
                return None
            return ("the tensors are on the CPU; Triton needs a CUDA/ROCm device "
                    "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)")
        if not call.device.startswith("cuda"):
            return f"tensors on {call.device}; Triton runs on CUDA/ROCm devices"
        from .ops import fp32_refusal

        return fp32_refusal(call.dtype, call.head_dim, "cuda")

    def _fp8_refusal(self, call) -> str | None:
        """Why this machine's Triton cannot run the FP8 call (None if it can): fp8 tensor-core
        products need NVIDIA sm_89+ (e4m3fn), or AMD CDNA3 (gfx94x: e4m3fnuz) and later targets,
        whose fp8 is OCP e4m3fn (gfx950, RDNA4). The interpreter runs both."""
        if call.head_dim > MAX_HEAD_DIM:
            return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
        if call.device.startswith("cpu"):
            if interpreting():
                return None
            return ("the tensors are on the CPU; Triton needs a CUDA/ROCm device "
                    "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)")
        if not call.device.startswith("cuda"):
            return f"tensors on {call.device}; Triton runs on CUDA/ROCm devices"
        from .common import device_arch

        arch = device_arch(call.q.device.index or 0)
        if self.flavour == "cuda":
            if call.dtype != "float8_e4m3fn":
                return f"{call.dtype} is AMD's float8; NVIDIA's fp8 tensor cores take float8_e4m3fn"
            major, minor = divmod(int(arch[2:]) if arch[2:].isdigit() else 0, 10)
            if (major, minor) < (8, 9):
                return f"float8 needs fp8 tensor cores (sm_89 and later), this GPU is {arch}"
            return None
        want = "float8_e4m3fnuz" if arch.startswith("gfx94") else "float8_e4m3fn"
        if not (arch.startswith(("gfx94", "gfx95", "gfx12"))):
            return f"float8 needs fp8 matrix cores (gfx94x, gfx950, gfx12), this GPU is {arch}"
        if call.dtype != want:
            return f"{arch}'s fp8 matrix cores take {want}, got {call.dtype}"
        return None

    @staticmethod
    def _slopes_and_sinks(call, slopes, batch: int):
        """ALiBi ``slopes`` (validated float32 NumPy ``[batch, Hq]``, the caller's tensor left on the
        device, or None) and the call's sinks as the kernels read them: float32, contiguous, on the
        call's device. A device tensor is converted there (no host round trip); a host array is
        uploaded as a copy, since a validated array may be a read-only view of the caller's."""
        import torch

        dev = call.q.device

        def placed(x, shape):
            return None if x is None else feature_table(x.tensor if isinstance(x, OnDevice) else x, shape, dev)
        alibi = placed(slopes, (batch, call.heads_q))
        if call.sinks_grad is not None:
            # The caller's learned tensor itself, so autograd carries d sinks back to it.
            sinks = call.sinks_grad.to(device=dev, dtype=torch.float32).contiguous()
        else:
            sinks = placed(call.sinks, (call.heads_q,))
        return alibi, sinks

    def attention(self, call):
        from .ops import attention_forward, mask_tensors, triton_attention

        alibi, sinks = self._slopes_and_sinks(call, call.alibi, call.batch)
        kspan, mask = mask_tensors(call.mask, call.batch, call.heads_q, call.q.device)
        if call.descale is not None:
            # FP8 is forward only (call.py refuses gradients), so no autograd wrapper.
            import torch

            out, lse = attention_forward(call.q, call.k, call.v, call.scale, call.left, call.right,
                                         softcap=call.softcap, alibi=alibi, sinks=sinks, kspan=kspan, mask=mask,
                                         descale=call.descale, out_dtype=getattr(torch, call.out_dtype))
            return out, (lse if call.return_lse else None)
        out, lse = triton_attention(call.q, call.k, call.v, call.scale, call.left, call.right,
                                    call.softcap, alibi, sinks, kspan, mask, check=call.device_values)
        return out, (lse if call.return_lse else None)

    # -- varlen: packed sequences, one launch per kernel ----------------------------------------
    def why_not_varlen_attention(self, call, forced):
        w = call.whole
        reason = self.missing_features(w) or self.why_not_attention(w, forced)
        if reason:
            return reason
        if call.batch > _MAX_GRID_YZ:
            return f"{call.batch} sequences > {_MAX_GRID_YZ}, the grid's limit along the sequences"
        if max(w.seq_q, w.seq_k) > _MAX_INT32:
            return f"{max(w.seq_q, w.seq_k)} packed rows: the kernels' cu_seqlens are int32"
        return None

    def varlen_attention(self, call):
        from .ops import device_packing, packing, triton_varlen_attention

        if call.device_values and nothing_to_compute(call.whole):
            call = call.on_host()  # no kernel will run to check what was left on the device
        w = call.whole
        alibi, sinks = self._slopes_and_sinks(w, call.alibi, call.batch)
        # w.q is q seen as [1, Hq, total_q, D]; the kernels take the packed tensors themselves.
        q, k, v = (x[0].transpose(0, 1) for x in (w.q, w.k, w.v))
        if isinstance(call.cu_q, np.ndarray):
            pack = packing(call.cu_q, call.cu_k, w.q.device)
        else:  # the caller's offsets, unread: the kernels check them, max_seqlen sizes the grid
            pack = device_packing(call.cu_q, call.cu_k, call.max_q, call.max_k)
        out, lse = triton_varlen_attention(q, k, v, pack, w.scale, w.left, w.right, w.softcap, alibi, sinks,
                                           check=call.device_values)
        return out, (lse if w.return_lse else None)

    # -- paged attention and KV writes ----------------------------------------------------------
    def _paged_reason(self, kind: str, device: str, dtype: str, head_dim: int) -> str | None:
        if kind != "torch":
            return "the Triton kernels take torch tensors"
        if device.startswith("cpu") and not interpreting():
            return "the tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernels there)"
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
        if head_dim > MAX_HEAD_DIM:
            return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
        return None

    def why_not_paged_attention(self, call, forced):
        if call.q_kind != "torch":
            return "the Triton kernels take torch tensors"
        return self._paged_reason(call.kind, call.device, call.dtype, call.head_dim)

    def why_not_write_kv(self, call, forced):
        return self._paged_reason(call.kind, call.device, call.dtype, call.head_dim)

    def paged_attention(self, call):
        from .paged import paged_attention_triton

        alibi, sinks = (None if x is None else x.tensor if isinstance(x, OnDevice) else x
                        for x in (call.alibi, call.sinks))
        return paged_attention_triton(call.q, call.k_cache, call.v_cache, call.block_tables,
                                      call.context_lens, call.scale, call.left, call.max_context,
                                      check=call.checks == "device" or call.device_values,
                                      query_start_loc=call.query_start_loc,
                                      max_query_len=call.q_len if call.packed else None,
                                      softcap=call.softcap, alibi=alibi, sinks=sinks)

    def write_kv(self, call):
        from .paged import copy_kv_triton

        copy_kv_triton(call.key, call.value, call.k_cache, call.v_cache, call.slot_mapping,
                       check=call.checks == "device")

    # -- storage for PagedKVCache: torch tensors on the cache's device --------------------------
    def allocate_cache(self, spec):
        import torch

        dev = torch.device(spec.device or ("cpu" if interpreting() else "cuda"))
        dt = getattr(torch, spec.dtype)
        return torch.zeros(spec.shape, dtype=dt, device=dev), torch.zeros(spec.shape, dtype=dt, device=dev)

    def copy_slots(self, k_cache, v_cache, src, dst):
        import torch

        src = torch.as_tensor(src, device=k_cache.device)
        dst = torch.as_tensor(dst, device=k_cache.device)
        for cache in (k_cache, v_cache):
            flat = cache.view(-1, *cache.shape[2:])
            flat[dst] = flat[src]

    def to_host(self, cache):
        from ...arrays import to_numpy

        return to_numpy(cache)

    def place_tables(self, table, k_cache):
        import torch

        t = torch.from_numpy(table)
        if k_cache.device.type == "cuda":
            # From pinned memory the copy is queued behind earlier work instead of waiting for it.
            return t.pin_memory().to(k_cache.device, non_blocking=True)
        return t.to(k_cache.device)

    def details(self):
        import torch
        import triton

        from .common import device_arch

        return {"device": torch.cuda.get_device_name(0), "arch": device_arch(0),
                "torch": torch.__version__, "triton": triton.__version__}


class TritonAMDBackend(TritonBackend):
    """AMD GPUs through a ROCm build of torch: the same kernels with AMD configurations."""

    name = "triton-amd"
    flavour = "hip"


__all__ = ["TritonBackend", "TritonAMDBackend"]
