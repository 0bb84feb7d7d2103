"""Which integer-weight kernels this machine's torch has, whether they compute right, and ours.

Run on x86-64 and on aarch64 (a Pi, or an arm64 root under qemu-user, where only presence and
correctness mean anything, not speed), then compare the last line: the digest of the weights
that the agent's own widening (``agent.model.quantized``) produces from the same seeded
weights. Equal digests mean a Pi widens to exactly the numbers measured here.

    .venv/bin/python tests/bench/int_kernels.py
"""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.model.quantized import StoredLayer, quantize, scheme_of, widen

SHAPES = ((640, 320), (1280, 640, 3, 3), (320, 4, 3, 3))


def weights_of(shape: tuple[int, ...]) -> torch.Tensor:
    """Return weights in [-0.05, 0.05) made by integer arithmetic: the same bits on every CPU.

    (``torch.randn`` is not: its vectorized path differs between CPU capabilities.)
    """
    count = torch.Size(shape).numel()
    integers = (torch.arange(count, dtype=torch.int64) * 1103515245 + 12345) % 2**31
    return (integers.to(torch.float32) / 2**31 - 0.5).mul_(0.1).view(shape)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).norm() / reference.norm())


def try_kernel(name: str, run: object) -> None:
    """Print whether a kernel is there, and its error against float32 arithmetic."""
    try:
        error = run()  # type: ignore[operator]
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        print(f"{name}: not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return
    print(f"{name}: runs, relative error against the float32 product {error:.2e}")


def int8pack() -> float:
    torch.manual_seed(0)
    weight, inputs = torch.randn(256, 128), torch.randn(8, 128)
    scale = weight.abs().amax(dim=1) / 127
    integers = torch.round(weight / scale[:, None]).to(torch.int8)
    result = torch.ops.aten._weight_int8pack_mm(inputs, integers, scale)
    return relative_error(result, inputs @ (integers.float() * scale[:, None]).T)


def int4pack() -> float:
    torch.manual_seed(0)
    weight, inputs = torch.randn(256, 128), torch.randn(8, 128)
    groups = weight.view(256, -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    levels = torch.round(groups / scale).clamp(-8, 7)
    unsigned = (levels + 8).to(torch.int32).view(256, 128)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    # [groups, out, (scale, zero)]: the weight is (q - 8) * scale + zero, zero 0 when symmetric.
    scales_and_zeros = torch.stack([scale.squeeze(-1), torch.zeros(256, 4)], dim=-1)
    scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous()
    result = torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, packed, 32, scales_and_zeros)
    return relative_error(result, inputs @ (levels * scale).view(256, 128).T)


def dyn_quant_4bit() -> float:
    torch.manual_seed(0)
    weight, inputs = torch.randn(256, 128), torch.randn(8, 128)
    groups = weight.view(256, -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7
    levels = torch.round(groups / scale).clamp(-8, 7).view(256, 128)
    unsigned = (levels + 8).to(torch.uint8)
    packed_bytes = (unsigned[:, 1::2] << 4 | unsigned[:, ::2]).contiguous()
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
        packed_bytes, scale.squeeze(-1).float(), None, 32, 128, 256
    )
    result = torch.ops.aten._dyn_quant_matmul_4bit(inputs, packed, 32, 128, 256)
    return relative_error(result, inputs @ (levels.view(256, -1, 32) * scale).view(256, 128).T)


def main() -> None:
    """Print the machine, each kernel's presence and error, and the widening's digest."""
    print(f"{platform.machine()}, torch {torch.__version__}")
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    kleidiai = getattr(getattr(torch.backends, "kleidiai", None), "is_available", lambda: None)
    print(f"KleidiAI (torch.backends.kleidiai): {kleidiai()}")
    try_kernel("aten._weight_int8pack_mm", int8pack)
    try_kernel("aten._weight_int4pack_mm_for_cpu", int4pack)
    try_kernel("aten._dyn_quant_matmul_4bit", dyn_quant_4bit)
    digest = hashlib.sha256()
    for shape in SHAPES:
        weight = weights_of(shape)
        for form in ("int8", "int4"):
            layer = StoredLayer("layer", scheme_of(shape, form), shape)
            integers, scale = quantize(weight, layer)
            for layout in (torch.contiguous_format, torch.channels_last):
                if layout is torch.channels_last and len(shape) != 4:
                    continue
                into = torch.empty(shape).contiguous(memory_format=layout)
                widened = widen(integers, scale, into)
                digest.update(integers.numpy().tobytes())
                digest.update(widened.contiguous().numpy().tobytes())
    print(f"the agent's widening, int8 and int4, both layouts: sha256 {digest.hexdigest()}")


if __name__ == "__main__":
    main()
