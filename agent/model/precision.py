"""Where the model runs and in which precision: device, compute dtype, weight storage, files.

Each ``auto`` is decided from the machine itself: its architecture, torch's own CPU capability
query (CPUID on x86, the kernel's hardware capabilities on Arm) and the memory limit that applies
to the process. ``/proc/cpuinfo`` is read only in the line of the machine's own architecture:
under qemu-user emulation an arm64 root sees the host's x86 ``flags`` line, which must not make
an emulated Pi 5 pick bfloat16.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agent.machine.memory import GIB
from agent.model.half_probe import half_compute_speedup

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class CpuFeature:
    """A CPU feature, under the names torch's capability query and ``/proc/cpuinfo`` give it."""

    torch_names: tuple[str, ...]
    cpuinfo_names: tuple[str, ...]

    def named(self) -> str:
        """Return the feature's names, as an operator reads them in the log."""
        return " or ".join(dict.fromkeys((*self.cpuinfo_names, *self.torch_names)))


BF16_FEATURES = {
    "x86_64": CpuFeature(("avx512_bf16", "amx_bf16"), ("avx512_bf16", "amx_bf16")),
    "aarch64": CpuFeature(("bf16",), ("bf16",)),
}
"""CPU features that make bfloat16 matrix maths several times faster than float32, per
architecture."""
NATIVE_HALF_FEATURES = {
    "x86_64": CpuFeature(("avx512_fp16", "amx_fp16"), ("avx512_fp16", "amx_fp16")),
    "aarch64": CpuFeature(("fp16_arith",), ("asimdhp", "fphp")),
}
"""CPU features that compute float16 itself rather than converting it to float32: only with one
of them can float16 arithmetic beat float32, so only there is it measured. Without, on x86 the
float16 kernels are a fallback 60-100x slower than float32 (measured on a Zen 4 EPYC)."""
CPUINFO_FEATURE_LINE = {"x86_64": "flags", "aarch64": "Features"}
HALF_COMPUTE_SPEEDUP_NEEDED = 1.25
"""On a CPU without bfloat16, float16 arithmetic replaces float32 only when the probe finds the
UNet's operators at least this much faster in it: a margin above the probe's own noise."""
HALF_WEIGHTS_BELOW_BYTES = 16 * GIB
"""float32 SDXL holds 13.4 GB after load and peaks near 18 GB: below 16 GiB, store weights in
half precision."""


def machine_architecture(machine: str | None = None) -> str:
    """Return the architecture as torch and the kernel name it: ``x86_64`` or ``aarch64``."""
    name = (machine or platform.machine()).lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def cpuinfo_features(cpuinfo: str, architecture: str) -> set[str] | None:
    """Return the features ``/proc/cpuinfo`` lists for this architecture.

    Returns:
        The feature names, or None when the text has no line for this architecture (another
        architecture's text, as under emulation, or no text at all).
    """
    key = CPUINFO_FEATURE_LINE.get(architecture)
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if key is not None and name.strip() == key:
            return set(value.split())
    return None


def torch_cpu_capabilities() -> Mapping[str, Any] | None:
    """Return torch's CPU capability query (CPUID / hwcaps), where this torch has it."""
    query = getattr(torch.cpu, "get_capabilities", None)
    return query() if query is not None else None


def cpu_has(
    features: Mapping[str, CpuFeature],
    architecture: str,
    cpuinfo: str,
    capabilities: Mapping[str, Any] | None,
) -> bool:
    """Return whether this CPU has one of ``features``' entry for its architecture.

    Both witnesses must agree where both speak: torch's capability query, and the feature line
    of ``/proc/cpuinfo`` for this architecture. A cpuinfo with no such line (another
    architecture's text under emulation) is no witness.

    Args:
        features: The feature per architecture (:data:`BF16_FEATURES`,
            :data:`NATIVE_HALF_FEATURES`).
        architecture: ``x86_64`` or ``aarch64`` (:func:`machine_architecture`).
        cpuinfo: The text of ``/proc/cpuinfo``.
        capabilities: :func:`torch_cpu_capabilities`, or None where torch has no such query.
    """
    feature = features.get(architecture)
    if feature is None:
        return False
    listed = cpuinfo_features(cpuinfo, architecture)
    if capabilities is None and listed is None:
        return False
    by_torch = capabilities is None or any(capabilities.get(name) for name in feature.torch_names)
    by_cpuinfo = listed is None or any(name in listed for name in feature.cpuinfo_names)
    return by_torch and by_cpuinfo


def cpu_has_bf16(
    architecture: str,
    cpuinfo: str,
    capabilities: Mapping[str, Any] | None,
) -> bool:
    """Return whether this CPU computes bfloat16 natively (:func:`cpu_has`)."""
    return cpu_has(BF16_FEATURES, architecture, cpuinfo, capabilities)


@dataclasses.dataclass(frozen=True)
class CpuArithmetic:
    """Which reduced precisions this machine's CPU computes itself."""

    architecture: str
    bfloat16: bool
    float16: bool
    bfloat16_withheld: bool = False
    """The CPU lists bfloat16 but oneDNN was told not to use it (``ONEDNN_MAX_CPU_ISA``)."""

    def lacks(self) -> str:
        """Return what the CPU lacks, as the log says it."""
        if self.architecture not in BF16_FEATURES:
            return f"no bfloat16 or float16 arithmetic known on {self.architecture}"
        bfloat16 = (
            "bfloat16 withheld from oneDNN (ONEDNN_MAX_CPU_ISA)"
            if self.bfloat16_withheld
            else f"no {BF16_FEATURES[self.architecture].named()}"
        )
        return f"{bfloat16} and no {NATIVE_HALF_FEATURES[self.architecture].named()}"


def machine_arithmetic() -> CpuArithmetic:
    """Return which reduced precisions this machine's CPU computes itself.

    On x86-64 bfloat16 also needs oneDNN's consent: oneDNN computes it there, and
    ``ONEDNN_MAX_CPU_ISA`` (as for a CPU of an older class) can withhold the instructions.
    """
    architecture = machine_architecture()
    cpuinfo = read_cpuinfo()
    capabilities = torch_cpu_capabilities()
    listed = cpu_has_bf16(architecture, cpuinfo, capabilities)
    withheld = listed and architecture == "x86_64" and not onednn_computes_bf16()
    return CpuArithmetic(
        architecture=architecture,
        bfloat16=listed and not withheld,
        float16=cpu_has(NATIVE_HALF_FEATURES, architecture, cpuinfo, capabilities),
        bfloat16_withheld=withheld,
    )


def onednn_computes_bf16() -> bool:
    """Return whether oneDNN has bfloat16 kernels for this CPU (and may use them)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # noqa: SLF001 - no public name


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    """Return ``/proc/cpuinfo``, or nothing where it cannot be read."""
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""


def choose_device(setting: str) -> str:
    """Return the torch device: ``auto`` means cuda where a GPU is present, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def choose_dtype(
    setting: str,
    device: str,
    *,
    arithmetic: CpuArithmetic | None = None,
    half_speedup: Callable[[], float] | None = None,
) -> torch.dtype:
    """Return the precision: auto is float16 on cuda, bfloat16 on a CPU with it, else float32.

    On a CPU without bfloat16 that computes float16 itself (a Raspberry Pi 5), float16 is chosen
    where the probe finds it at least :data:`HALF_COMPUTE_SPEEDUP_NEEDED` times faster than
    float32. float16 keeps more mantissa than bfloat16 and is the precision SDXL-Turbo's fp16
    files are made to run in; it also computes straight from float16 weights, with no upcast.
    A CPU that only converts float16 (most x86 CPUs) computes in float32 at once: no probe.

    Args:
        setting: ``auto`` or a dtype name.
        device: ``cpu`` or ``cuda``.
        arithmetic: What the CPU computes itself; asked of the machine when None.
        half_speedup: Measures float16's speed over float32; None measures it against float32
            with float16-stored weights, as on every Pi (:func:`half_compute_speedup`).
    """
    if setting != "auto":
        return DTYPES[setting]
    if device == "cuda":
        return torch.float16
    if arithmetic is None:
        arithmetic = machine_arithmetic()
    if arithmetic.bfloat16:
        return torch.bfloat16
    if not arithmetic.float16:
        log.info(
            "computing in float32: this CPU has %s, so neither precision can beat float32 here "
            "(nothing to measure)",
            arithmetic.lacks(),
        )
        return torch.float32
    speedup = half_speedup() if half_speedup is not None else half_compute_speedup(upcast=True)
    chosen = torch.float16 if speedup >= HALF_COMPUTE_SPEEDUP_NEEDED else torch.float32
    log.info(
        "no bfloat16 on this CPU; float16 runs the UNet's operators %.2fx as fast as float32 "
        "(%.2fx needed): computing in %s",
        speedup,
        HALF_COMPUTE_SPEEDUP_NEEDED,
        dtype_name(chosen),
    )
    return chosen


def use_half_weights(setting: str, device: str, dtype: torch.dtype, memory_limit: int) -> bool:
    """Return whether to store linear and convolution weights in float16, computing in float32.

    Args:
        setting: ``auto``, ``on`` or ``off``.
        device: ``cpu`` or ``cuda``.
        dtype: The compute precision.
        memory_limit: Bytes this process may use (its cgroup's limit, else physical memory).
    """
    if setting != "auto":
        return setting == "on"
    return device == "cpu" and dtype == torch.float32 and memory_limit < HALF_WEIGHTS_BELOW_BYTES


PACKED_DTYPES = (torch.bfloat16,)
"""Precisions whose layers are packed: bfloat16, 1.2x faster for the whole image
(docs/performance.md). In float32 torch hands linear layers to MKL, not oneDNN: per layer,
packing gained 0-37% on linear shapes and lost on some convolutions, and for the whole image
packed float32 was no faster (0.98x the unpacked median over 5 paired rounds, peak 17.2
against 14.8 GiB, load 33 against 24 s), so float32 is left as it is."""


def packs_weights(
    setting: bool, device: str, compute: torch.dtype, *, held_in_compute: bool
) -> bool:
    """Return whether to pack linear and convolution weights for oneDNN.

    On x86-64 only, where it was measured, and where oneDNN computes bfloat16 (a CPU without it
    could be asked for bfloat16 by the ``dtype`` setting).

    Args:
        setting: The ``packed_weights`` setting.
        device: ``cpu`` or ``cuda``.
        compute: The precision the model computes in.
        held_in_compute: Whether the weights are held as copies in ``compute`` (not float16 or
            int8 storage upcast at each use).
    """
    return (
        setting
        and held_in_compute
        and compute in PACKED_DTYPES
        and _onednn_computes(device, compute)
    )


def _onednn_computes(device: str, compute: torch.dtype) -> bool:
    """Return whether oneDNN runs this CPU's layers in ``compute``, on x86-64 (where measured).

    bfloat16 only where oneDNN has kernels for it: a CPU without them could be asked for
    bfloat16 by the ``dtype`` setting. oneDNN on Arm goes through another library, whose
    operators on packed or fused layers were not measured.
    """
    return (
        device == "cpu"
        and machine_architecture() == "x86_64"
        and torch.backends.mkldnn.is_available()
        and (compute != torch.bfloat16 or onednn_computes_bf16())
    )


FUSED_DTYPES = (torch.bfloat16, torch.float32)
"""Precisions whose tiny decoder computes its ReLUs and residual sums inside its convolutions:
both decode faster that way (docs/performance.md). float16 arithmetic (a Pi's lever) is left
as it is: not measured."""


def fuses_decoder(setting: bool, device: str, compute: torch.dtype, *, channels_last: bool) -> bool:
    """Return whether TAESD's ReLUs and residual sums run inside its convolutions (oneDNN).

    On x86-64 only, where it was measured (oneDNN on Arm goes through another library, whose
    support for these fusions is not measured), in bfloat16 only where oneDNN computes it, and
    with channels_last weights: oneDNN adds a residual only in that layout, and torch's fallback
    for the other has no bfloat16.

    Args:
        setting: The ``fused_decoder`` setting.
        device: ``cpu`` or ``cuda``.
        compute: The precision the decoder computes in.
        channels_last: Whether convolution weights take the channels_last layout
            (:func:`agent.model.weights.channels_last_layout`).
    """
    return (
        setting and channels_last and compute in FUSED_DTYPES and _onednn_computes(device, compute)
    )


def choose_variant(setting: str, model: str) -> str | None:
    """Return the weight files to load: ``auto`` takes the fp16 files where the model has them.

    A hub id gets ``fp16`` (SDXL-Turbo's fp16 files are half the download and load without a
    conversion); a local folder gets it only when it holds ``*.fp16.safetensors`` files.
    """
    if setting != "auto":
        return setting or None
    folder = Path(model)
    if not folder.is_dir():
        return "fp16"
    return "fp16" if any(folder.glob("*/*.fp16.safetensors")) else None


def load_dtype(
    device: str, dtype: torch.dtype, *, variant: str | None, half_weights: bool
) -> torch.dtype:
    """Return the precision to load in: on a CPU, float16 when the weights end in 16 bits.

    Loading in the checkpoint's own precision maps the files without a copy: weights kept in
    that precision stay file-backed, and :func:`agent.weights.place_weights` converts the others
    one tensor at a time. A float32 model from full-precision files is loaded as float32, so it
    loses nothing.
    """
    if device == "cpu" and (half_weights or dtype != torch.float32 or variant == "fp16"):
        return torch.float16
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Return the setting name of a torch dtype (``float32`` for ``torch.float32``)."""
    return str(dtype).removeprefix("torch.")
