"""How much faster float16 arithmetic is than float32 on this CPU, measured at start.

Whether float16 pays depends on the CPU (a Cortex-A76 has it natively) and on the kernels this
torch build has for it: the probe measures both at once, where a feature list would only say
what the CPU could do. :func:`agent.model.precision.choose_dtype` asks it only on a CPU that
lists float16 arithmetic and lacks bfloat16; everywhere else float16 can only be converted, and
the answer is known without a measurement.

Every worker start pays for it, so it is bounded twice: its timed repeats stop at a deadline
(:data:`PROBE_BUDGET_S`), and float16 is first timed on a small slice of the work, so a CPU whose
float16 kernel is a slow fallback (60-100x slower than float32 on x86 without AVX512-FP16) is
found out for a thirty-second of the full run's cost.

Only the worker process imports this module (it imports torch).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING

import torch

from agent.model.upcast import UpcastArena
from agent.model.weights import channels_last_layout

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

PROBE_REPEATS = 3
PROBE_BUDGET_S = 1.0
"""Seconds after which the probe makes no run it could do without: half for float32, the rest
for float16. Each operator still runs once untimed and once timed in each precision."""
GIVE_UP_SLOWER = 4.0
"""float16 this many times slower than float32 at an operator is decided: no need to time it in
full (a slice predicts it)."""
SLICE = 32
"""float16 is first timed on 1/SLICE of each operator's work, whose time times SLICE predicts the
full run's."""
MATMUL_SHARE = 0.69
"""The matrix multiplies' share of the UNet's matrix work at 512x512, the convolutions' being the
rest (torch's FlopCounterMode: 1,235 and 547 GFLOP)."""
TOKENS = 128
"""Rows of the probe's matrix multiply (half the 256 tokens of the UNet's deepest level at
512x512: the kernels run at full speed from far fewer)."""
PROBE_MATMUL_GFLOP = 2 * TOKENS * 1280 * 5120 / 1e9
PROBE_CONVOLUTION_GFLOP = 2 * 640 * 640 * 9 * 32 * 16 / 1e9


@dataclasses.dataclass(frozen=True)
class OperatorTiming:
    """What the probe measured of one operator in one precision."""

    seconds: float
    """The fastest full run, or the time a slice predicts where the slice was answer enough."""
    predicted: bool = False
    """Whether ``seconds`` comes from a slice (the full run was never made)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The probe's answer and what it is made of."""

    speedup: float
    """How many times faster float16 runs the UNet's operators than float32; 0 where this torch
    has no float16 kernel for one of them."""
    float32: tuple[OperatorTiming, OperatorTiming]
    """The matrix multiply's and the convolution's timings in float32."""
    float16: tuple[OperatorTiming, OperatorTiming] | None
    """The same in float16; None where a kernel is missing."""


def _fastest_run(
    operation: Callable[[], object],
    repeats: int,
    give_up_after: float = float("inf"),
    deadline: float = float("inf"),
) -> float:
    """Return the fastest of up to ``repeats`` timed runs of ``operation``, after a first run.

    The first run pays for one-time work (kernel selection, caches) and is not counted, unless it
    takes longer than ``give_up_after`` seconds: then its time is answer enough. One timed run is
    always made; more only before ``deadline`` (a ``time.perf_counter`` value).
    """
    begun = time.perf_counter()
    operation()
    first = time.perf_counter() - begun
    if first > give_up_after:
        return first
    fastest = float("inf")
    for run in range(repeats):
        if run > 0 and time.perf_counter() >= deadline:
            break
        begun = time.perf_counter()
        operation()
        fastest = min(fastest, time.perf_counter() - begun)
    return fastest


def _predicted_from_slice(operation: Callable[[int], object]) -> float:
    """Return the seconds a full run of ``operation`` would take, from its second run on a slice.

    The first slice run builds the slice's kernels and is not counted.
    """
    operation(SLICE)
    begun = time.perf_counter()
    operation(SLICE)
    return (time.perf_counter() - begun) * SLICE


def time_float32(
    operators: Sequence[Callable[[int], object]], *, repeats: int, deadline: float
) -> list[OperatorTiming]:
    """Time each operator in full, with repeats only before ``deadline``.

    Args:
        operators: Each operator, called with n to run 1/n of its work.
        repeats: Timed runs per operator at most; the fastest counts.
        deadline: A ``time.perf_counter`` value after which only the runs needed are made.
    """
    return [
        OperatorTiming(_fastest_run(functools.partial(op, 1), repeats, deadline=deadline))
        for op in operators
    ]


def time_float16(
    operators: Sequence[Callable[[int], object]],
    float32: Sequence[OperatorTiming],
    *,
    repeats: int,
    deadline: float,
) -> list[OperatorTiming]:
    """Time each operator, first on a slice: where that predicts a loss, the slice answers.

    Args:
        operators: Each operator in float16, called with n to run 1/n of its work.
        float32: The same operators' float32 timings (:func:`time_float32`).
        repeats: Timed runs per operator at most; the fastest counts.
        deadline: A ``time.perf_counter`` value after which only the runs needed are made.

    Raises:
        RuntimeError: torch has no float16 kernel for one of the operators on this CPU.
    """
    timings = []
    for op, reference in zip(operators, float32, strict=True):
        limit = reference.seconds * GIVE_UP_SLOWER
        predicted = _predicted_from_slice(op)
        if predicted > limit:
            timings.append(OperatorTiming(predicted, predicted=True))
            continue
        seconds = _fastest_run(
            functools.partial(op, 1), repeats, give_up_after=limit, deadline=deadline
        )
        timings.append(OperatorTiming(seconds))
    return timings


def _operators(dtype: torch.dtype, *, upcast: bool) -> list[Callable[[int], object]]:
    """Return the UNet's two kinds of matrix work in ``dtype``, each taking a slice divisor.

    The feed-forward input projection of the UNet's deepest level (1,280 channels in, 5,120 out,
    on :data:`TOKENS` tokens) and a 3x3 convolution of its middle level (640 channels on a 32x16
    map), with the weights lent and laid out as the pipeline does. About 5.5 GFLOP a run: 0.05 s
    on a 2-core Xeon, about 0.15 s on a Raspberry Pi 5 by its float32 rate.

    Args:
        dtype: The arithmetic's precision.
        upcast: Lend each float16 weight upcast from an :class:`UpcastArena` before its operator
            runs, as the float16-stored path does.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(TOKENS, 1280, generator=generator).to(dtype)
    projection = (torch.randn(5120, 1280, generator=generator) / 36).half()
    kernel = (torch.randn(640, 640, 3, 3, generator=generator) / 76).half()
    # Laid out as the pipeline lays out this precision with EDGEAI_CHANNELS_LAST at its default.
    layout = (
        torch.channels_last
        if channels_last_layout(requested=True, device="cpu", compute=dtype)
        else torch.contiguous_format
    )
    feature_map = torch.randn(1, 640, 32, 16, generator=generator).to(dtype, memory_format=layout)
    arena = UpcastArena(dtype, channels_last=layout == torch.channels_last) if upcast else None
    if arena is not None:
        arena.reserve(max(projection.numel(), kernel.numel()))

    def with_weight(
        operator: Callable[[torch.Tensor, int], torch.Tensor], weight: torch.Tensor
    ) -> Callable[[int], object]:
        """Return ``operator`` run as the pipeline runs it: on a lent upcast, or its own copy."""
        if arena is None:
            held = weight.to(
                dtype, memory_format=layout if weight.dim() == 4 else torch.preserve_format
            )
            return lambda part: operator(held, part)

        def upcast_and_run(part: int) -> torch.Tensor:
            lent, _in_buffer = arena.lend(weight)
            try:
                return operator(lent, part)
            finally:
                arena.give_back()

        return upcast_and_run

    def linear(weight: torch.Tensor, part: int) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.linear(tokens[: TOKENS // part], weight)

    def convolution(weight: torch.Tensor, part: int) -> torch.Tensor:
        # A slice keeps the map's full width (the layout's inner dimension) and fewer rows.
        rows = max(feature_map.shape[2] // part, 1)
        with torch.inference_mode():
            return torch.nn.functional.conv2d(feature_map[:, :, :rows], weight, padding=1)

    return [with_weight(linear, projection), with_weight(convolution, kernel)]


def _seconds_per_gflop(timings: Sequence[OperatorTiming]) -> float:
    """Return the seconds per GFLOP of the UNet's matrix work, weighting each operator's rate.

    Each operator counts by its share of the UNet's FLOPs: 69% matrix multiplies, 31%
    convolutions.
    """
    linear, convolution = timings
    return (
        MATMUL_SHARE * linear.seconds / PROBE_MATMUL_GFLOP
        + (1 - MATMUL_SHARE) * convolution.seconds / PROBE_CONVOLUTION_GFLOP
    )


def probe_half_compute(
    *, upcast: bool, repeats: int = PROBE_REPEATS, budget: float = PROBE_BUDGET_S
) -> ProbeResult:
    """Measure how many times faster this CPU runs the UNet's operators in float16 than float32.

    Args:
        upcast: The float32 alternative keeps its weights in float16 and upcasts each before
            use (:func:`agent.model.precision.use_half_weights`, below 16 GiB): time that
            copy too.
        repeats: Timed runs per operator at most; the fastest counts.
        budget: Seconds after which the probe makes only the runs it needs.
    """
    begun = time.perf_counter()
    full = time_float32(
        _operators(torch.float32, upcast=upcast), repeats=repeats, deadline=begun + budget / 2
    )
    try:
        half = time_float16(
            _operators(torch.float16, upcast=False),
            full,
            repeats=repeats,
            deadline=begun + budget,
        )
    except RuntimeError:  # no float16 kernel for one of the operators on this CPU
        return ProbeResult(0.0, (full[0], full[1]), None)
    return ProbeResult(
        speedup=_seconds_per_gflop(full) / _seconds_per_gflop(half),
        float32=(full[0], full[1]),
        float16=(half[0], half[1]),
    )


def half_compute_speedup(*, upcast: bool) -> float:
    """Return how many times faster float16 runs the UNet's operators here.

    Args:
        upcast: As for :func:`probe_half_compute`.
    """
    return probe_half_compute(upcast=upcast).speedup
