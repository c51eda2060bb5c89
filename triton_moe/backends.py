"""Backend selection: ``backend=`` argument, else ``$TRITON_MOE_BACKEND``, else ``triton``.

| backend   | what runs                                                                 |
|-----------|---------------------------------------------------------------------------|
| `triton`  | every stage as a Triton kernel (CUDA tensors, or CPU tensors under        |
|           | `TRITON_INTERPRET=1`)                                                     |
| `cutlass` | the Triton pipeline with both grouped GEMMs from the CuTe DSL kernel      |
|           | (`cutlass_backend`, needs nvidia-cutlass-dsl and a CUDA GPU)              |
| `torch`   | the PyTorch reference (`reference/`): exact, slow, syncs the host         |

A backend that cannot run raises :class:`BackendUnavailableError` saying why; nothing
ever falls back to another backend silently.
"""
from __future__ import annotations

import os

import torch
import triton

BACKENDS = ("triton", "cutlass", "torch")
DEFAULT_BACKEND = "triton"
ENV_VAR = "TRITON_MOE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The selected backend cannot run here (package missing, no GPU, ...)."""


def triton_interpreter_enabled() -> bool:
    """$TRITON_INTERPRET as Triton itself reads it ("1", "true", "on", ...)."""
    return bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str | None = None) -> str:
    """The backend name to use: the argument, else the env var, else the default."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_VAR) or DEFAULT_BACKEND
        source = f"${ENV_VAR}"
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a backend; valid: {', '.join(BACKENDS)}")
    return backend.lower()


def unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (default: CUDA if present), or None."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # pragma: no cover - triton is a hard dependency
            return f"triton is not importable ({exc})"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return (f"the triton backend runs on CUDA tensors, or on CPU tensors under the Triton "
                f"interpreter (set TRITON_INTERPRET=1 before importing triton); got {device}")
    if backend == "cutlass":
        import cutlass_backend

        ok, reason = cutlass_backend.is_available()
        if not ok:
            return reason
        if device.type != "cuda":
            return f"the cutlass backend runs on CUDA tensors only; got {device}"
        return None
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def require_backend(backend: str | None, device: torch.device | str) -> str:
    """Resolve the backend name and raise BackendUnavailableError if it cannot run."""
    name = resolve_backend(backend)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return name


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Every backend mapped to None if it can run on ``device``, else the reason."""
    return {name: unavailable_reason(name, device) for name in BACKENDS}
