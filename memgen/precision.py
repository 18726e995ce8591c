"""Pick a compute precision the hardware actually runs fast, and say what was picked and why.

bf16 autocast on a CPU is only fast where the CPU has bf16 instructions (AVX512-BF16 or
AMX-BF16) *and* PyTorch dispatches to its AVX512 kernels. Elsewhere (AVX2 laptops and many
cloud CPUs) every bf16 op is emulated: one demo pretraining step took 53 s in bf16 against
1.45 s in fp32 on a 2-core AVX2 machine. So "auto" means bf16 only where it is native, and
an explicit bf16 request on a CPU without it is honoured but warned about loudly.

``torch.backends.cpu.get_cpu_capability()`` reports the kernel level PyTorch dispatches to
(``AVX512``, ``AVX2``, ``DEFAULT``, ...; ``ATEN_CPU_CAPABILITY=avx2`` lowers it), and the
instruction flags come from ``torch.cpu``'s CPU-feature probes.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
BF16_SLOWDOWN_NOTE = (
    "bf16 autocast on a CPU without native bf16 is emulated: measured 36x slower than fp32 "
    "(53 s against 1.45 s per demo pretraining step on a 2-core AVX2 CPU)"
)


def cpu_capability() -> str:
    """The kernel level PyTorch dispatches to on this CPU (e.g. ``AVX512``, ``AVX2``)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls and elementwise ops run in hardware on this CPU (not emulated)."""
    if cpu_capability() not in ("AVX512",):  # bf16 kernels live in the AVX512 dispatch level only
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def device_has_native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return True  # other accelerators (mps, xpu, ...) ship bf16 units; trust the user's request


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """What runs: ``fp32`` or ``bf16``."""
    requested: str
    reason: str

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "requested": self.requested,
            "reason": self.reason,
            "cpu_capability": cpu_capability(),
        }


def check_precision(requested: str, name: str = "precision") -> None:
    if requested not in PRECISIONS:
        raise ConfigError(f"{name} must be one of {list(PRECISIONS)}, got {requested!r}")


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
    return f"cpu (capability {cpu_capability()})" if device.type == "cpu" else str(device)


def warn_if_bf16_emulated(device: torch.device | str) -> None:
    """The warning an explicit bf16 request gets where bf16 is not native (e.g. ``--mixed-precision bf16``)."""
    if not device_has_native_bf16(device):
        warn_emulated_bf16(describe_device(device))


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """``auto`` -> bf16 where the device runs it natively, else fp32; ``fp32``/``bf16`` as asked (bf16 warned)."""
    check_precision(requested)
    native = device_has_native_bf16(device)
    where = describe_device(device)
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, "fp32 requested")
    if requested == "bf16":
        if not native:
            warn_emulated_bf16(where)
        return PrecisionChoice("bf16", requested, "bf16 requested" + ("" if native else " (emulated: slow)"))
    if native:
        return PrecisionChoice("bf16", requested, f"auto: {where} runs bf16 natively")
    return PrecisionChoice("fp32", requested, f"auto: {where} has no native bf16, so fp32 (bf16 would be emulated)")


BASE_DTYPES = ("auto", "float32", "bfloat16")


def resolve_base_dtype(requested: str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype a frozen base is stored and run in, and why: ``auto`` -> bfloat16 where bf16 is native.

    Measured on SmolLM2-135M-Instruct (docs/benchmarks.md, "A real checkpoint"): on a CPU with
    native bf16 (AVX512-BF16) a bfloat16 base decodes 1.7-2.0x faster than float32 with memgen's
    ratios against ``generate`` unchanged, and memory off still equals ``generate`` token for
    token; where bf16 is emulated it is many times slower. This is a different choice from
    bf16 *autocast* over a float32 base (``resolve_precision``), which casts every weight on
    every op and was slower than float32 for weaver SFT on the same CPU.
    """
    if requested not in BASE_DTYPES:
        raise ConfigError(f"base dtype must be one of {list(BASE_DTYPES)}, got {requested!r}")
    if requested != "auto":
        if requested == "bfloat16":
            warn_if_bf16_emulated(device)
        return getattr(torch, requested), f"{requested} requested"
    where = describe_device(device)
    if device_has_native_bf16(device):
        return torch.bfloat16, f"auto: {where} runs bf16 natively (a bfloat16 base decodes 1.7-2.0x faster)"
    return torch.float32, f"auto: {where} has no native bf16, so float32"


def warn_emulated_bf16(where: str) -> None:
    message = f"bf16 requested on {where}, which has no native bf16. {BF16_SLOWDOWN_NOTE}. Use fp32 ('no') here."
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def autocast(precision: str, device: torch.device | str = "cpu"):
    """An autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
