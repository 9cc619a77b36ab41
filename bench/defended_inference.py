"""How fast the defended model (T then f) labels images, by memory format and dtype.

    OMP_NUM_THREADS=2 python -m bench.defended_inference --threads 2

A warm standard audit spends most of its evaluation in the probe battery after REFINE:
500 images x 158 probes through T and f (bench/results/audit_cost_standard_checkpoint.json:
evaluate 202 s of 432). This times that inference (U-Net width 16, small CNN, batches
of 500 as the probes send them, seeded random weights and images) as the audit runs it
(``inference_transform``: T alone in channels-last, ``no_grad``) against the earlier
all-contiguous layout, ``inference_mode``, the whole model in channels-last and bf16
autocast, and counts how often each variant's labels equal the contiguous fp32 ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from auditor.models import ArchConfig, UNet, UNetConfig, build_classifier
from auditor.refine import DefendedModel, inference_transform
from bench.common import RESULTS, provenance, write_json

CPU = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--out", type=Path, default=RESULTS / "defended_inference.json")
    return p.parse_args(argv)


def labels(model: torch.nn.Module, x: torch.Tensor, batch: int, context: Callable[[], AbstractContextManager[Any]],
           channels_last: bool) -> torch.Tensor:
    out = []
    with context():
        for start in range(0, len(x), batch):
            xb = x[start : start + batch]
            out.append(model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb).argmax(1))
    return torch.cat(out)


def bf16_autocast() -> AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    defended = DefendedModel(UNet(UNetConfig(width=16)), build_classifier(ArchConfig("small_cnn")),
                             torch.randperm(10)).eval()
    x = torch.rand(args.images, 1, 28, 28)
    reference = labels(defended, x, args.batch, torch.no_grad, channels_last=False)
    channels_last = copy.deepcopy(defended).to(memory_format=torch.channels_last)
    audit = DefendedModel(inference_transform(defended.transform), defended.model, defended.mapping).eval()
    variants = {"T channels_last, no_grad (the audit: inference_transform)": (audit, torch.no_grad, False),
                "contiguous, no_grad (the audit before)": (defended, torch.no_grad, False),
                "contiguous, inference_mode": (defended, torch.inference_mode, False),
                "T and f channels_last, no_grad": (channels_last, torch.no_grad, True),
                "bf16 autocast, no_grad": (defended, bf16_autocast, False)}
    results = {}
    load_before = os.getloadavg()
    for name, (model, context, cl) in variants.items():
        labels(model, x[: args.batch], args.batch, context, cl)  # warm-up: kernels chosen, caches filled
        started = time.perf_counter()
        predicted = labels(model, x, args.batch, context, cl)
        seconds = time.perf_counter() - started
        results[name] = {"images_per_s": round(args.images / seconds, 1),
                         "same_labels_as_contiguous": float((predicted == reference).float().mean())}
        print(name, results[name], flush=True)
    write_json(args.out, {"variants": results, "images": args.images, "batch": args.batch,
                          "load_average_before": load_before, "load_average_after": os.getloadavg(),
                          **provenance(CPU, "bench.defended_inference")})


if __name__ == "__main__":
    main()
