"""How much faster float16 arithmetic is than float32 on this CPU, measured at start.

Whether float16 pays depends on the CPU (a Cortex-A76 has it natively, many x86 CPUs only
convert) and on the kernels this torch build has for it: the probe measures both at once, where
a feature list would only say what the CPU could do. :func:`agent.model.precision.choose_dtype`
asks it on a CPU without bfloat16.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from agent.model.upcast import UpcastArena
from agent.model.weights import channels_last_layout

if TYPE_CHECKING:
    from collections.abc import Callable

PROBE_REPEATS = 3
MATMUL_SHARE = 0.69
"""The matrix multiplies' share of the UNet's matrix work at 512x512, the convolutions' being the
rest (torch's FlopCounterMode: 1,235 and 547 GFLOP)."""
PROBE_MATMUL_GFLOP = 2 * 256 * 1280 * 5120 / 1e9
PROBE_CONVOLUTION_GFLOP = 2 * 640 * 640 * 9 * 32 * 32 / 1e9


def _fastest_run(
    operation: Callable[[], object], repeats: int, give_up_after: float = float("inf")
) -> float:
    """Return the fastest of ``repeats`` timed runs of ``operation``, after a first run.

    The first run pays for one-time work (kernel selection, caches) and is not counted, unless it
    takes longer than ``give_up_after`` seconds: then its time is answer enough, and a CPU with
    only a slow fallback kernel does not hold up the start for long.
    """
    begun = time.perf_counter()
    operation()
    first = time.perf_counter() - begun
    if first > give_up_after:
        return first
    fastest = float("inf")
    for _ in range(repeats):
        begun = time.perf_counter()
        operation()
        fastest = min(fastest, time.perf_counter() - begun)
    return fastest


def _operator_seconds(
    dtype: torch.dtype,
    *,
    upcast: bool,
    repeats: int,
    give_up_after: tuple[float, float] = (float("inf"), float("inf")),
) -> tuple[float, float]:
    """Return this CPU's seconds for the UNet's two kinds of matrix work in ``dtype``.

    Times the feed-forward input projection of the UNet's deepest level (256 tokens at 512x512,
    1,280 channels in, 5,120 out) and a 3x3 convolution of its middle level (640 channels on a
    32x32 map), with the weights lent and laid out as the pipeline does. About 11 GFLOP a run:
    0.1 s on a 2-core Xeon, about 0.3 s on a Raspberry Pi 5 (by its float32 rate; the whole
    probe, eight runs, about 1 s here and a few seconds there, once per worker start).

    Args:
        dtype: The arithmetic's precision.
        upcast: Lend each float16 weight upcast from an :class:`UpcastArena` before its operator
            runs, as the float16-stored path does.
        repeats: Timed runs; the fastest counts.
        give_up_after: Seconds after which a first run of each operator is answer enough.

    Returns:
        The seconds of the matrix multiply and of the convolution.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(256, 1280, generator=generator).to(dtype)
    projection = (torch.randn(5120, 1280, generator=generator) / 36).half()
    kernel = (torch.randn(640, 640, 3, 3, generator=generator) / 76).half()
    # Laid out as the pipeline lays out this precision with EDGEAI_CHANNELS_LAST at its default.
    layout = (
        torch.channels_last
        if channels_last_layout(requested=True, device="cpu", compute=dtype)
        else torch.contiguous_format
    )
    feature_map = torch.randn(1, 640, 32, 32, generator=generator).to(dtype, memory_format=layout)
    arena = UpcastArena(dtype, channels_last=layout == torch.channels_last) if upcast else None
    if arena is not None:
        arena.reserve(max(projection.numel(), kernel.numel()))

    def with_weight(
        operator: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor
    ) -> Callable[[], torch.Tensor]:
        """Return ``operator`` run as the pipeline runs it: on a lent upcast, or its own copy."""
        if arena is None:
            held = weight.to(
                dtype, memory_format=layout if weight.dim() == 4 else torch.preserve_format
            )
            return lambda: operator(held)

        def upcast_and_run() -> torch.Tensor:
            lent, _in_buffer = arena.lend(weight)
            try:
                return operator(lent)
            finally:
                arena.give_back()

        return upcast_and_run

    with torch.inference_mode():
        linear = _fastest_run(
            with_weight(lambda weight: torch.nn.functional.linear(tokens, weight), projection),
            repeats,
            give_up_after[0],
        )
        convolution = _fastest_run(
            with_weight(
                lambda weight: torch.nn.functional.conv2d(feature_map, weight, padding=1), kernel
            ),
            repeats,
            give_up_after[1],
        )
    return linear, convolution


def _seconds_per_gflop(seconds: tuple[float, float]) -> float:
    """Return the seconds per GFLOP of the UNet's matrix work, from :func:`_operator_seconds`.

    Each operator counts by its share of the UNet's FLOPs: 69% matrix multiplies, 31%
    convolutions.
    """
    linear, convolution = seconds
    return (
        MATMUL_SHARE * linear / PROBE_MATMUL_GFLOP
        + (1 - MATMUL_SHARE) * convolution / PROBE_CONVOLUTION_GFLOP
    )


def half_compute_speedup(*, upcast: bool, repeats: int = PROBE_REPEATS) -> float:
    """Return how many times faster this CPU runs the UNet's operators in float16 than float32.

    A torch that cannot compute in float16 on this CPU gives 0.

    Args:
        upcast: The float32 alternative keeps its weights in float16 and upcasts each before
            use (:func:`agent.model.precision.use_half_weights`, below 16 GiB): time that
            copy too.
        repeats: Timed runs per precision; the fastest counts.
    """
    full = _operator_seconds(torch.float32, upcast=upcast, repeats=repeats)
    # float16 four times slower is decided at its first run: no need to time it again.
    limits = (full[0] * 4, full[1] * 4)
    try:
        half = _operator_seconds(torch.float16, upcast=False, repeats=repeats, give_up_after=limits)
    except RuntimeError:  # no float16 kernel for one of the operators on this CPU
        return 0.0
    return _seconds_per_gflop(full) / _seconds_per_gflop(half)
