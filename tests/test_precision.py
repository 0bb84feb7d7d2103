"""Which precision each CPU class computes in, and the float16 probe's cost and bounds.

The CPU classes a user owns: a Xeon with AMX, a Zen 4 EPYC (AVX-512 with bfloat16, no AMX, no
float16 arithmetic), an AVX2-only mini PC (Intel N100 class) and a Raspberry Pi 5 (float16
arithmetic, no bfloat16). Their ``/proc/cpuinfo`` and torch's capability query are the inputs;
nothing here depends on the speed of the CPU the suite runs on.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest
import torch

from agent.model import half_probe, pipeline, precision
from agent.model.half_probe import (
    GIVE_UP_SLOWER,
    PROBE_REPEATS,
    SLICE,
    _fastest_run,
    _seconds_per_gflop,
    probe_half_compute,
    time_float16,
    time_float32,
)
from agent.model.pipeline import Text2Image
from agent.model.precision import (
    CpuArithmetic,
    choose_dtype,
    cpu_has,
    cpu_has_bf16,
    cpuinfo_features,
    machine_architecture,
    machine_arithmetic,
    use_half_weights,
)
from agent.model.protocol import PipelineOptions
from tests.conftest import generate

DATA = Path(__file__).parent / "data"
PI5_CPUINFO = (DATA / "cpuinfo-raspberry-pi-5.txt").read_text()
XEON_CPUINFO = (DATA / "cpuinfo-xeon-amx.txt").read_text()
EPYC_CPUINFO = (DATA / "cpuinfo-epyc-zen4.txt").read_text()
AVX2_CPUINFO = re.sub(r" avx512\w*", "", EPYC_CPUINFO)
"""An AVX2-only CPU's flags (the Intel N100 class): the EPYC's without the AVX-512 family."""
PI5_TORCH = {"architecture": "aarch64", "neon": True, "fp16_arith": True, "bf16": False}
XEON_TORCH = {
    "architecture": "x86_64",
    "avx512_bf16": True,
    "amx_bf16": True,
    "avx512_fp16": True,
    "amx_fp16": False,
}
EPYC_TORCH = {
    "architecture": "x86_64",
    "avx512_bf16": True,
    "amx_bf16": False,
    "avx512_fp16": False,
    "amx_fp16": False,
}
AVX2_TORCH = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "avx512_fp16": False}


def probed() -> float:
    raise AssertionError("the probe ran where the choice was already made")


@pytest.mark.parametrize(
    ("architecture", "cpuinfo", "capabilities", "bfloat16", "float16"),
    [
        pytest.param("aarch64", PI5_CPUINFO, PI5_TORCH, False, True, id="raspberry-pi-5"),
        pytest.param("x86_64", XEON_CPUINFO, XEON_TORCH, True, True, id="xeon-with-amx"),
        pytest.param("x86_64", EPYC_CPUINFO, EPYC_TORCH, True, False, id="epyc-zen-4"),
        pytest.param("x86_64", AVX2_CPUINFO, AVX2_TORCH, False, False, id="avx2-only"),
        # qemu-user: an arm64 root reads the x86 host's cpuinfo; its flags are no witness.
        pytest.param("aarch64", XEON_CPUINFO, PI5_TORCH, False, True, id="pi-5-emulated"),
        pytest.param("x86_64", XEON_CPUINFO, None, True, True, id="xeon-torch-without-query"),
        pytest.param("aarch64", PI5_CPUINFO, None, False, True, id="pi-5-torch-without-query"),
        pytest.param(
            "x86_64",
            XEON_CPUINFO,
            {"avx512_bf16": False, "avx512_fp16": False},
            False,
            False,
            id="torch-and-cpuinfo-disagree",
        ),
        pytest.param("aarch64", "", {"bf16": True}, True, False, id="arm-cpuinfo-unreadable"),
        pytest.param("riscv64", "", {}, False, False, id="another-architecture"),
    ],
)
def test_what_each_cpu_computes_itself(architecture, cpuinfo, capabilities, bfloat16, float16):
    assert cpu_has_bf16(architecture, cpuinfo, capabilities) is bfloat16
    assert cpu_has(precision.NATIVE_HALF_FEATURES, architecture, cpuinfo, capabilities) is float16


@pytest.mark.parametrize(
    ("arithmetic", "speedup", "expected"),
    [
        pytest.param(CpuArithmetic("x86_64", True, True), probed, torch.bfloat16, id="xeon-amx"),
        pytest.param(CpuArithmetic("x86_64", True, False), probed, torch.bfloat16, id="zen-4"),
        pytest.param(CpuArithmetic("x86_64", False, False), probed, torch.float32, id="avx2"),
        pytest.param(
            CpuArithmetic("aarch64", False, False), probed, torch.float32, id="cortex-a72"
        ),
        pytest.param(CpuArithmetic("aarch64", False, True), lambda: 2.0, torch.float16, id="pi-5"),
        pytest.param(
            CpuArithmetic("aarch64", False, True), lambda: 1.0, torch.float32, id="pi-5-slow-fp16"
        ),
    ],
)
def test_auto_precision_per_cpu_class(arithmetic, speedup, expected):
    assert choose_dtype("auto", "cpu", arithmetic=arithmetic, half_speedup=speedup) == expected


def test_a_cpu_that_only_converts_float16_says_why_it_computes_in_float32(caplog):
    caplog.set_level(logging.INFO, logger="agent.model.precision")
    avx2 = CpuArithmetic("x86_64", bfloat16=False, float16=False)
    assert choose_dtype("auto", "cpu", arithmetic=avx2, half_speedup=probed) == torch.float32
    (line,) = [r.getMessage() for r in caplog.records]
    assert "computing in float32" in line
    assert "no avx512_bf16 or amx_bf16 and no avx512_fp16 or amx_fp16" in line
    assert "nothing to measure" in line
    # A CPU with bfloat16 that oneDNN is told not to use (ONEDNN_MAX_CPU_ISA=AVX2): said so.
    held_back = CpuArithmetic("x86_64", bfloat16=False, float16=False, bfloat16_withheld=True)
    assert "bfloat16 withheld from oneDNN" in held_back.lacks()


@pytest.mark.parametrize(
    ("speedup", "expected"),
    [
        pytest.param(2.0, torch.float16, id="float16-twice-as-fast"),
        pytest.param(1.25, torch.float16, id="float16-just-fast-enough"),
        pytest.param(1.1, torch.float32, id="float16-within-noise"),
        pytest.param(0.6, torch.float32, id="float16-converted-only"),
        pytest.param(0.0, torch.float32, id="no-float16-kernel"),
    ],
)
def test_float16_arithmetic_where_the_probe_finds_it_faster(speedup, expected):
    pi5 = CpuArithmetic("aarch64", bfloat16=False, float16=True)
    assert choose_dtype("auto", "cpu", arithmetic=pi5, half_speedup=lambda: speedup) == expected
    # A GPU and an explicit setting never pay for the probe.
    assert choose_dtype("auto", "cuda", half_speedup=probed) == torch.float16
    assert choose_dtype("float32", "cpu", arithmetic=pi5, half_speedup=probed) == torch.float32


def test_a_slow_first_run_is_answer_enough():
    """A CPU with only a slow fallback float16 kernel must not hold up the worker's start."""
    runs = []

    def slow() -> None:
        runs.append(time.sleep(0.05))

    assert _fastest_run(slow, 3, give_up_after=0.01) >= 0.05
    assert len(runs) == 1  # decided at the first run
    assert _fastest_run(slow, 3, give_up_after=1.0) >= 0.05
    assert len(runs) == 1 + 4  # a first run, then three timed ones
    assert _fastest_run(slow, 3, deadline=time.perf_counter()) >= 0.05
    assert len(runs) == 5 + 2  # past its deadline: a first run and one timed run only


class Operator:
    """A stand-in operator whose full run takes ``seconds`` (a slice, its share): the probe's
    decisions under kernels of any speed, which no one CPU can show."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.parts: list[int] = []

    def __call__(self, part: int) -> None:
        self.parts.append(part)
        time.sleep(self.seconds / part)


def test_a_float16_kernel_far_slower_than_float32_is_found_out_on_a_slice():
    """float16 100x slower (x86 without AVX512-FP16): its full run is never made."""
    float32 = [Operator(0.01), Operator(0.02)]
    float16 = [Operator(1.0), Operator(2.0)]
    begun = time.perf_counter()
    full = time_float32(float32, repeats=PROBE_REPEATS, deadline=float("inf"))
    half = time_float16(float16, full, repeats=PROBE_REPEATS, deadline=float("inf"))
    elapsed = time.perf_counter() - begun
    assert all(timing.predicted for timing in half)
    assert all(op.parts == [SLICE, SLICE] for op in float16)
    for timing, op in zip(half, float16, strict=True):
        assert timing.seconds == pytest.approx(op.seconds, rel=0.3)
    # Two slices of each, where the full float16 runs alone would have taken 3 s, twice over.
    assert elapsed < sum(op.seconds for op in float16) / 2
    assert _seconds_per_gflop(full) / _seconds_per_gflop(half) < 1 / GIVE_UP_SLOWER


def test_the_probes_repeats_stop_at_its_deadline():
    float32 = [Operator(0.005), Operator(0.005)]
    float16 = [Operator(0.002), Operator(0.002)]
    full = time_float32(float32, repeats=PROBE_REPEATS, deadline=0.0)
    half = time_float16(float16, full, repeats=PROBE_REPEATS, deadline=0.0)
    # Past the deadline: a first and one timed run of each, after float16's two slices.
    assert [op.parts for op in float32] == [[1, 1], [1, 1]]
    assert [op.parts for op in float16] == [[SLICE, SLICE, 1, 1]] * 2
    assert not any(timing.predicted for timing in half)
    # Within it: every repeat.
    time_float32(float32, repeats=PROBE_REPEATS, deadline=float("inf"))
    assert [len(op.parts) for op in float32] == [2 + 1 + PROBE_REPEATS] * 2


@pytest.mark.parametrize("upcast", [True, False], ids=["float16-stored", "float32-stored"])
def test_the_float16_probe_times_both_precisions_on_this_cpu(upcast):
    """Whatever this CPU's float16 speed: both precisions ran, and the answer is their ratio."""
    result = probe_half_compute(upcast=upcast)
    assert result.float16 is not None  # torch has float16 kernels on x86-64 and aarch64
    assert all(timing.seconds > 0 for timing in (*result.float32, *result.float16))
    assert result.speedup == pytest.approx(
        _seconds_per_gflop(result.float32) / _seconds_per_gflop(result.float16)
    )
    # What was given up on was predicted slower than float32 by the margin, and only that.
    for full, half in zip(result.float32, result.float16, strict=True):
        if half.predicted:
            assert half.seconds > full.seconds * GIVE_UP_SLOWER


def test_a_start_on_a_cpu_without_bfloat16_loads_without_the_probe(tiny_model, monkeypatch, caplog):
    """This machine's capability inputs replaced by an AVX2-only CPU's: float32 at once."""
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2_CPUINFO)
    monkeypatch.setattr(precision, "torch_cpu_capabilities", lambda: AVX2_TORCH)
    monkeypatch.setattr(pipeline, "half_compute_speedup", lambda **_: probed())
    monkeypatch.setattr(half_probe, "probe_half_compute", lambda **_: probed())
    caplog.set_level(logging.INFO, logger="agent.model.precision")
    model = Text2Image(
        PipelineOptions(model=str(tiny_model), tiny_vae=str(tiny_model / "taesd"), threads=1)
    )
    assert model.loaded.dtype == "float32"
    assert any("nothing to measure" in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(machine_architecture() != "x86_64", reason="oneDNN's ISA cap is x86's")
def test_an_agent_on_this_cpu_held_to_avx2_starts_without_bfloat16(broker, make_agent):
    """The N100-class stand-in the benchmark uses, end to end: oneDNN and torch held to AVX2."""
    agent = make_agent(broker, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    client = broker.client()
    try:
        assert generate(client, agent)["status"] == "ok"
    finally:
        client.close()
    log = agent.log()
    if machine_arithmetic().float16:  # AVX512-FP16 (a Xeon's): measured, and said so
        assert "float16 runs the UNet's operators" in log
    else:
        assert "bfloat16 withheld from oneDNN (ONEDNN_MAX_CPU_ISA)" in log
        assert "nothing to measure" in log
    assert 'dtype="bfloat16"' not in agent.metrics()


def test_this_machine_is_read_by_architecture():
    assert machine_architecture("AMD64") == "x86_64"
    assert machine_architecture("arm64") == "aarch64"
    assert cpuinfo_features(PI5_CPUINFO, "aarch64") >= {"fp", "asimd", "asimdhp"}
    assert cpuinfo_features(XEON_CPUINFO, "aarch64") is None
    assert "avx512_bf16" in cpuinfo_features(XEON_CPUINFO, "x86_64")
    assert "avx512_bf16" in cpuinfo_features(EPYC_CPUINFO, "x86_64")
    assert "avx2" in cpuinfo_features(AVX2_CPUINFO, "x86_64")
    assert not {"avx512f", "avx512_bf16"} & cpuinfo_features(AVX2_CPUINFO, "x86_64")


def test_precision_and_memory_choices():
    zen4 = CpuArithmetic("x86_64", bfloat16=True, float16=False)
    assert choose_dtype("auto", "cuda") == torch.float16
    assert choose_dtype("float32", "cpu", arithmetic=zen4) == torch.float32
    assert use_half_weights("on", "cpu", torch.bfloat16, 64 * 2**30)
    assert not use_half_weights("auto", "cpu", torch.bfloat16, 4 * 2**30)
    assert not use_half_weights("off", "cpu", torch.float32, 4 * 2**30)
    # auto follows the memory limit that applies (a cgroup's), not the machine's memory.
    assert use_half_weights("auto", "cpu", torch.float32, 7 * 2**30)
    assert not use_half_weights("auto", "cpu", torch.float32, 32 * 2**30)
