"""What one REFINE train step costs on this CPU, and which layout and dtype levers pay.

    python -m bench.refine_step                 # one torch thread, the committed configuration
    python -m bench.refine_step --threads 2 --rounds 5

Measures, in one run so the figures are comparable:

* this machine's matmul peaks (2048x2048, fp32 and bf16): the ceiling a train step is judged against;
* one REFINE train step (U-Net width 16, batch 128, the kd + supervised-contrastive loss, AdamW) against a small
  CNN, for fp32 / bf16 autocast (where the CPU has it natively) x default / channels-last layout, interleaved over
  several rounds (median), with
  its FLOPs counted by ``torch.utils.flop_counter``, so achieved GFLOP/s and the share of the peak follow;
* a ``torch.profiler`` profile of the step as the audit trains it (channels-last, bf16 where native): the
  share of its time per operator family, and the rate of its dense kernels alone.

The step is built from the trainer's own pieces (the U-Net, the losses, autocast), deliberately below the audit:
a layout or dtype lever has no spec field, and what it changes is the cost of one step. No audit-level figure
comes from here. The audit's REFINE throughput, through ``run_audit``, is ``bench/audit_cost.py``'s (it reuses
``step_flops`` to turn that rate into GFLOP/s), and a lever's effect on BA/ASR across the seven attacks is the
product-path benchmarks' (channels-last is the default they run). ``refine_step.json`` came from an
avx512_bf16 machine and an earlier version of this script that also trained REFINE twice to compare layouts.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from auditor.models import ArchConfig, UNet, UNetConfig, build_classifier
from auditor.refine import RefineConfig
from auditor.refine.losses import fit_loss, supcon_loss
from auditor.refine.remap import derangement, inverse
from auditor.runtime import cpu_bf16_pays
from auditor.training import autocast
from bench.common import RESULTS, cpu_features, provenance, write_json

CPU = torch.device("cpu")
BATCH, WIDTH = 128, 16


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best of a few square matmuls: the dense-compute ceiling for ``dtype`` at the current thread count.

    Without native bf16 (AVX2 only) a 2048-square bf16 matmul takes about a minute; 512 gives the same rate.
    """
    if dtype == torch.bfloat16 and not cpu_bf16_pays(CPU):
        size = min(size, 512)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def matmul_peaks() -> dict[str, float]:
    """Both peaks a train step may be judged against, at the current torch threads."""
    return {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}


class StepRig:
    """One REFINE train step, as ``auditor.refine.trainer`` takes it, for a given dtype and layout."""

    def __init__(self, model: torch.nn.Module, bf16: bool, channels_last: bool, seed: int = 0,
                 unet: UNetConfig | None = None, batch: int = BATCH):
        torch.manual_seed(seed)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        # Its own copy in the step's layout, as the trainer lays out f: rigs of other layouts may share ``model``.
        self.model, self.bf16 = copy.deepcopy(model).to(memory_format=layout), bf16
        self.transform = UNet(unet or RefineConfig().unet).to(CPU, memory_format=layout)
        self.optimizer = torch.optim.AdamW(self.transform.parameters(), lr=3e-3)
        self.inv = inverse(derangement(10, seed))
        self.x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=layout)
        with torch.no_grad(), autocast(CPU, bf16):  # the trainer answers its pool once, before the first step
            self.clean = self.model(self.x).float()

    def step(self) -> None:
        clean = self.clean
        with autocast(CPU, self.bf16):
            transformed = self.transform(self.x)
            logits = self.model(transformed).float()
        loss = fit_loss("kd", logits, clean, self.inv, 2.0) + 0.1 * supcon_loss(transformed, clean.argmax(1), 0.07)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def step_flops(model: torch.nn.Module, unet: UNetConfig | None = None, batch: int = BATCH) -> int:
    """FLOPs of one train step (forward, backward, optimizer) on a ``batch`` of 28x28 images: the same in any dtype."""
    rig = StepRig(model, bf16=False, channels_last=False, unet=unet, batch=batch)
    with FlopCounterMode(display=False) as counter:
        rig.step()
    return counter.get_total_flops()


#: Operator families of a train step's profile: matmuls by exact name, the rest by the first matching substring.
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
OP_FAMILIES = (
    ("convolution", ("conv",)),
    ("pooling and resampling", ("pool", "upsample")),
    ("normalisation", ("norm",)),
    ("optimizer", ("_foreach", "adam")),
    ("dtype and layout copies", ("copy", "_to_copy", "clone", "contiguous", "empty_strided")),
)


def op_family(name: str) -> str:
    """The family a profiled operator counts toward (OP_FAMILIES)."""
    if name in MATMUL_OPS:
        return "matmul"
    lowered = name.lower()
    return next((family for family, keys in OP_FAMILIES if any(k in lowered for k in keys)), "other elementwise")


def profile_step(model: torch.nn.Module, unet: UNetConfig, batch: int, bf16: bool, flops: int,
                 steps: int = 5) -> dict[str, Any]:
    """Where a train step's time goes (torch.profiler, self CPU time per operator): what holds it below the peak.

    The dense kernels (convolutions, matmuls) are the part that can approach the matmul peak; the
    profile shows how fast they ran and how much of the step went to the memory-bound rest (pooling,
    resampling, activations, normalisation, the optimizer, dtype casts), which no faster dense kernel
    can recover. ``flops``: one step's, as ``step_flops`` counted them.
    """
    rig = StepRig(model, bf16=bf16, channels_last=True, unet=unet, batch=batch)
    for _ in range(2):
        rig.step()  # warm-up: oneDNN builds its kernels on first use
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            rig.step()
    wall = (time.perf_counter() - started) / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    families: dict[str, float] = {}
    for e in events:
        families[op_family(e.key)] = families.get(op_family(e.key), 0.0) + e.self_cpu_time_total / total
    dense = families.get("convolution", 0.0) + families.get("matmul", 0.0)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "steps": steps, "batch": batch, "train_dtype": "bf16" if bf16 else "fp32", "profiled_seconds_per_step": wall,
        "family_share": {k: round(v, 3) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "dense_share": round(dense, 3),
        "dense_kernel_gflops": round(flops / (wall * dense) / 1e9, 1) if dense else None,
        "top_ops": [{"op": e.key, "family": op_family(e.key), "share": round(e.self_cpu_time_total / total, 3),
                     "calls_per_step": e.count // steps} for e in top],
    }


def time_steps(model: torch.nn.Module, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step for each variant, the variants interleaved within every round so load drifts hit all alike."""
    dtypes = (False, True) if cpu_bf16_pays(CPU) else (False,)  # emulated bf16 (AVX2 only): never trained in
    variants = {f"{'bf16' if b else 'fp32'}-{'channels_last' if c else 'contiguous'}": (b, c)
                for b in dtypes for c in (False, True)}
    rigs = {name: StepRig(model, *flags) for name, flags in variants.items()}
    for rig in rigs.values():
        rig.step()  # warm-up: oneDNN builds its kernels on first use
    seconds: dict[str, list[float]] = {name: [] for name in rigs}
    for _ in range(rounds):
        for name, rig in rigs.items():
            started = time.perf_counter()
            for _ in range(steps):
                rig.step()
            seconds[name].append((time.perf_counter() - started) / steps)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "refine_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = build_classifier(ArchConfig("small_cnn", in_channels=1, num_classes=10)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    peaks = matmul_peaks()
    flops = step_flops(model)
    seconds = time_steps(model, args.rounds, args.steps)
    steps: dict[str, Any] = {}
    for name, samples in seconds.items():
        median = statistics.median(samples)
        peak = peaks[name.split("-")[0]]
        steps[name] = {"seconds_per_step": round(median, 4), "images_per_s": round(BATCH / median, 1),
                       "achieved_gflops": round(flops / median / 1e9, 1),
                       "share_of_peak": round(flops / median / 1e9 / peak, 3), "samples": [round(s, 4) for s in samples]}
    write_json(args.out, {
        **provenance(CPU, "bench.refine_step"),
        "cpu_flags": cpu_features(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "step": {"batch": BATCH, "unet_width": WIDTH, "gflop_per_step": round(flops / 1e9, 2), "variants": steps},
        "profile": profile_step(model, UNetConfig(width=WIDTH), BATCH, bf16=cpu_bf16_pays(CPU), flops=flops),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
