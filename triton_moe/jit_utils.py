"""@triton.jit helpers shared by several kernel families.

Each gives the same bits compiled and under the Triton interpreter, where some of
Triton's own conversions differ from compiled code and from torch.
"""
import triton
import triton.language as tl

# Whether kernels run under the Triton interpreter, as Triton itself reads
# $TRITON_INTERPRET (set before triton is imported, for the whole process); kernels branch
# on it at compile time.
INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def fp32_to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, by integer ops on the bits.

    Needed because the Triton 3.6 interpreter's ``.to(tl.bfloat16)`` truncates (and its
    "rtne" mode rounds half up), while compiled code and torch round to nearest even:
    this gives the same bits in both modes. NaN stays NaN (quiet).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    bf16_bits = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
    return bf16_bits.to(tl.bfloat16, bitcast=True)


@triton.jit
def to_output_dtype(x, dtype: tl.constexpr):
    """fp32 values -> ``dtype`` (bf16/fp16/fp32) with round-to-nearest-even in both modes.

    Compiled code converts with the hardware's RNE (``cvt.rn.bf16x2.f32``: one instruction
    per two values); only the interpreter takes ``fp32_to_bf16_rne``, whose ~6 integer
    instructions per value were ~45% of a GEMM2 tile's instructions at the default
    workload (4 K-blocks per tile). Same bits, except a NaN's payload (both quiet NaN).
    """
    if dtype == tl.bfloat16:
        if INTERPRETED:
            return fp32_to_bf16_rne(x)
        else:
            return x.to(tl.bfloat16)
    else:
        return x.to(dtype)  # fp16 / fp32: already RNE in both modes


# Programmatic dependent launch (PDL, sm_90+): a kernel launched with ``launch_pdl=True``
# may start while the kernel before it in the stream still runs, once every program of
# that kernel has called ``griddepcontrol.launch_dependents`` (or ended). It must then
# run ``griddepcontrol.wait`` (which returns when the kernel before has finished and its
# writes are visible) before it reads that kernel's outputs or writes anything. Both
# instructions do nothing in a kernel launched without PDL. The interpreter runs
# kernels one after another, so there they are left out.


@triton.jit
def pdl_launch_dependents(GDC: tl.constexpr):
    """Let the next kernel in the stream start (when it was launched with PDL)."""
    if GDC and not INTERPRETED:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(GDC: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible."""
    if GDC and not INTERPRETED:
        tl.extra.cuda.gdc_wait()

