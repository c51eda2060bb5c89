"""CuTe DSL (CUTLASS Python DSL) backend: the hybrid grouped INT8 GEMM of SPEC 5.

``grouped_gemm`` has the signature and semantics of ``triton_moe.gemm.grouped_gemm``
(docs/design.md, "Hybrid grouped GEMM"); the kernels live in ``cutlass_backend/gemm.py``
(SM80 ``mma.sync``, and the launcher) and ``cutlass_backend/gemm_sm90.py`` (Hopper: TMA +
int8 ``wgmma``).
The DSL (``nvidia-cutlass-dsl``) is optional: it is imported on first use, so importing
this package always works, and :func:`is_available` says why the backend cannot run.
"""
from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'triton-moe[cutlass]'"
# One K tile of the kernel is one quantization block (cutlass_backend/gemm.py).
SUPPORTED_BLOCK_K = (64, 128, 256)

_kernel_module = None


class CutlassUnavailableError(RuntimeError):
    """The CuTe DSL backend cannot run here (DSL missing or no CUDA)."""


def _dsl_import_error() -> str | None:
    """None if the DSL imports, else why not."""
    try:
        importlib.import_module("cutlass.cute")
    except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install's error
        return (f"the CUTLASS Python DSL (nvidia-cutlass-dsl) is not importable "
                f"({type(exc).__name__}: {exc}); install it with {INSTALL_HINT}")
    return None


def is_available() -> tuple[bool, str]:
    """(True, "") if the backend can run, else (False, the reason)."""
    reason = _dsl_import_error()
    if reason is not None:
        return False, reason
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA is not available (the CuTe DSL kernel runs on NVIDIA GPUs, sm_80+)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"needs an sm_80+ GPU; this one is sm_{major}{minor}"
    return True, ""


def _kernels():
    """The kernel module, imported on first use (raises with the install hint)."""
    global _kernel_module
    if _kernel_module is None:
        reason = _dsl_import_error()
        if reason is not None:
            raise CutlassUnavailableError(reason)
        _kernel_module = importlib.import_module("cutlass_backend.gemm")
    return _kernel_module


def grouped_gemm(a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, expert_offsets,
                 scale_row_offsets, *, act_block_m, block_n, block_k, super_group_size,
                 out_dtype, bias=None, out=None, tile=None):
    """Hybrid grouped GEMM (SPEC 5) of every expert in one launch, CuTe DSL kernel.

    Same arguments and result as ``triton_moe.gemm.grouped_gemm``; ``tile`` (a name of
    ``cutlass_backend.gemm.tile_names()``) overrides the default, which is ``$TRITON_MOE_
    CUTLASS_TILE`` if set, else "sm90_64x128" (Hopper kernel) on sm_90 when block_n fits its
    tile, else "small_racc" (SM80 kernel, 64x64); the reference design's "large" 128x64 /
    "small" 64x64 stay reachable. Raises :class:`CutlassUnavailableError` (a RuntimeError)
    if nvidia-cutlass-dsl is missing, ValueError for an unknown tile or a Hopper tile on
    another GPU.
    """
    return _kernels().grouped_gemm(
        a_q, a_qscale, a_fscale, b_q, b_qscale, b_fscale, expert_offsets, scale_row_offsets,
        act_block_m=act_block_m, block_n=block_n, block_k=block_k,
        super_group_size=super_group_size, out_dtype=out_dtype, bias=bias, out=out, tile=tile)


__all__ = ["INSTALL_HINT", "CutlassUnavailableError", "grouped_gemm", "is_available"]
