"""What an audit costs, stage by stage, and how far the code has come from the 45d0dbd baseline (Fashion-MNIST).

    OMP_NUM_THREADS=1 python -m bench.audit_cost                       # the full grid: a quiet machine, an hour+
    python -m bench.audit_cost --efforts tiny --sources checkpoint --no-baseline --no-demo \\
        --subject-train-size 2000 --out /tmp/audit_cost.json           # a smoke run (minutes)
    python -m bench.audit_cost --assemble --out F                      # F from the runs saved under F's folder
                                                                       # (a finished F keeps its demo and load)

A backdoored small CNN (BadNets, the recipe of ``refine-audit attack``) is audited through
``run_audit`` with spec fields only (``{"effort": E}``, plus ``model.api`` for the same
model served label-only over loopback HTTP), at each effort, for each source, by each
code version: ``new`` (this tree) and ``baseline`` (commit 45d0dbd, checked out with
``git worktree add`` and run with its own PYTHONPATH), side by side on the same machine
so each speed-up is a measured ratio. New-code audits run twice against one control-cache
folder: ``cold`` (empty: every control trained) then ``warm`` (the controls reused); the
baseline has no cache, so it runs cold only. ``--code new,previous --previous-commit REV`` times one
change: REV (from a worktree too) audits warm against the cache the new code's cold audit filled, right
before the new code's warm audit, so the two warm audits differ only by the change. Every audit runs in a child process
(``bench/audit_cost_worker.py``) whose wall time, CPU time (all threads and children,
``resource.getrusage``) and per-stage split are recorded, with BA before minus after (the
audit's figures) and the planted trigger's ASR on what the audit shipped (measured here).

``refine`` is the REFINE throughput of an audit itself: the plan's epochs x pool images over the
seconds its REFINE training took (``report.refine.seconds``) in the first new-code checkpoint run at the
highest effort measured. Achieved GFLOP/s is that rate times the FLOPs of one train step per image (the
trainer's step counted once by ``torch.utils.flop_counter`` at the plan's U-Net width and batch, no training),
beside this machine's fp32 and bf16 matmul peaks (2048x2048, same torch threads, measured in the same run),
with T's inference FLOPs relative to the audited model's, and a profile of that step (``refine_step.profile_step``:
the share of its time per operator family) to show what holds it below the peak. ``demo_wall_s`` is ``refine-audit demo`` end to end. The plans, the
per-stage CPU split and the controls of each audit go beside the output
(``<out>/runs/*.json``); the output keeps the fixed shape the README describes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from auditor.blackbox import ModelServer
from auditor.data import ImageSet, take
from auditor.models import ArchConfig, UNet, UNetConfig, build_classifier
from auditor.runtime import cpu_bf16_pays
from auditor.settings import Settings
from bench.audits import LOOPBACK, Subject, api_trigger_asr, fashion_mnist, make_subject, shipped_trigger_asr
from bench.common import RESULTS, cpu_flags, git_commit, provenance, write_json
from bench.refine_step import matmul_peaks, profile_step, step_flops

BASELINE_COMMIT = "45d0dbd"
EFFORTS = ("quick", "standard", "thorough")
WORKER = Path(__file__).resolve().parent / "audit_cost_worker.py"
TREE = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TRIGGER_TEST_IMAGES = 2000  # API audits: the planted trigger is scored through the API on this many test images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--efforts", default=",".join(EFFORTS))
    p.add_argument("--sources", default="checkpoint,api")
    p.add_argument("--code", default="new,baseline",
                   help="which code versions run the audits: new, baseline, previous (needs --previous-commit)")
    p.add_argument("--previous-commit", default=None,
                   help="a recent commit to time one change against: it shares the new code's control cache "
                        "and runs warm only, between the new code's cold and warm audits")
    p.add_argument("--no-baseline", action="store_true", help="same as --code new")
    p.add_argument("--no-demo", action="store_true", help="skip timing refine-audit demo")
    p.add_argument("--assemble", action="store_true",
                   help="run no audit: rebuild the output from the runs finished under <out>/runs (peaks measured now)")
    p.add_argument("--subject-train-size", type=int, default=None, help="training images of the audited model (all)")
    p.add_argument("--subject-epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the matmul peaks (the audits: OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-tree", type=Path, default=Path(f"/tmp/baseline-{BASELINE_COMMIT}"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/refine-audit-bench/audit_cost"))
    p.add_argument("--out", type=Path, default=RESULTS / "audit_cost.json")
    return p.parse_args(argv)


# -- the machine and the REFINE step -------------------------------------------------------------------------------


def forward_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def refine_throughput(details: list[dict[str, Any]], peaks: dict[str, float], threads: int) -> dict[str, Any] | None:
    """The audit's own REFINE rate, turned into GFLOP/s by one counted train step; None if no audit trained REFINE."""
    measured = [d for d in details if d["code"] == "new" and d["source"] == "checkpoint"
                and d.get("refine_seconds") and d.get("plan")]
    if not measured:
        return None
    run = max(measured, key=lambda d: EFFORTS.index(d["effort"]) if d["effort"] in EFFORTS else -1)
    refine, bf16 = run["plan"]["refine"], bool(run["plan"].get("bf16"))
    images_per_s = refine["epochs"] * refine["pool_images"] / run["refine_seconds"]
    model = build_classifier(ArchConfig("small_cnn")).eval().requires_grad_(False)
    unet, batch = UNetConfig(width=refine["unet_width"]), refine["batch_size"]
    flops = step_flops(model, unet, batch)
    flops_per_image = flops / batch
    achieved = images_per_s * flops_per_image / 1e9
    dtype = "bf16" if bf16 else "fp32"
    x = torch.rand(batch, 1, 28, 28)
    return {"images_per_s": images_per_s, "achieved_gflops": achieved, "train_dtype": dtype,
            "bf16_peak_gflops": peaks["bf16"], "fp32_peak_gflops": peaks["fp32"],
            "bound": {"peak": dtype, "peak_gflops": peaks[dtype], "fraction_of_peak": achieved / peaks[dtype],
                      "peak_threads": threads, "from_run": f"{run['effort']}-checkpoint-new-{run['cache']}",
                      "refine_seconds": run["refine_seconds"], "plan_refine": refine,
                      "step_gflop_per_image": flops_per_image / 1e9,
                      "profile": profile_step(model, unet, batch, bf16, flops),
                      "transform_over_model_flops": forward_flops(UNet(unet).eval(), x) / forward_flops(model, x)}}


# -- audits ------------------------------------------------------------------------------------------------------


def checkout(path: Path, commit: str) -> Path:
    """``commit`` checked out as a git worktree at ``path``, the first time it is needed."""
    if not (path / "auditor").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=TREE, check=True)
    return path


def run_worker(job: dict[str, Any], tree: Path, folder: Path) -> dict[str, Any]:
    """One audit in a child process on ``tree``'s code; its wall and CPU time as this process sees them."""
    folder.mkdir(parents=True, exist_ok=True)
    job_file, result_file = folder / "job.json", folder / "result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(WORKER), str(job_file), str(result_file)], env=env, cwd=folder,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (folder / "worker.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not result_file.exists():
        return {"status": "crashed", "error": {"code": f"exit {done.returncode}", "message": done.stderr[-2000:]},
                "process_wall_s": wall}
    result = json.loads(result_file.read_text())
    result["process_wall_s"] = wall  # includes interpreter start and imports, which the worker's own clock misses
    result["process_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def audit(subject: Subject, effort: str, source: str, code: str, cache: str, args: argparse.Namespace,
          tree: Path, test: ImageSet) -> tuple[dict[str, Any], dict[str, Any]]:
    """One audit as a user runs it, and what it costs (the row, and the worker's detail with the plan)."""
    name = f"{effort}-{source}-{code}-{cache}"
    folder = args.work_dir / name
    spec: dict[str, Any] = {"effort": effort, "seed": args.seed}
    job = {"spec": spec, "work_dir": str(folder / "audit"), "allowed_hosts": list(LOOPBACK),
           "control_cache": None if code == "baseline" else str(args.work_dir / f"control-cache-{effort}-{source}")}
    if cache == "cold" and job["control_cache"]:
        shutil.rmtree(job["control_cache"], ignore_errors=True)  # cold: every control trained
    if source == "checkpoint":
        job["model_path"] = str(subject.path)
        result = run_worker(job, tree, folder)
        asr_after = _scored(result, lambda out: shipped_trigger_asr(out, subject, test, CPU))
    else:
        with ModelServer(subject.model, protocol="v1", labels_only=True) as server:
            url = server.url + "/v1/models/model:predict"
            job["spec"] = {**spec, "model": {"source": "api", "api": {"url": url, "output": "labels"}}}
            result = run_worker(job, tree, folder)
            trigger_test = take(test, TRIGGER_TEST_IMAGES, args.seed + 1)
            asr_after = _scored(result, lambda out: api_trigger_asr(out, subject, url, "labels", trigger_test, CPU))
    before, after = result.get("ba_before"), result.get("ba_after")
    row = {"effort": effort, "source": source, "controls": result.get("controls", []), "cache": cache, "code": code,
           "wall_s": result.get("wall_s"), "cpu_s": result.get("cpu_s"), "stages": result.get("stages_wall", {}),
           "ba_drop": None if before is None or after is None else before - after, "asr_after": asr_after}
    write_json(args.out.with_suffix("") / "runs" / f"{name}.json", {**row, "detail": result, "job": job})
    print(json.dumps({k: row[k] for k in ("effort", "source", "code", "cache", "wall_s", "cpu_s", "ba_drop",
                                          "asr_after")}), result.get("status"), flush=True)
    return row, {**result, "effort": effort, "source": source, "code": code, "cache": cache}


def _scored(result: dict[str, Any], score: Any) -> float | None:
    """The trigger's ASR on what a succeeded audit shipped; None (and why, in the run's detail) otherwise."""
    if result["status"] != "succeeded":
        return None
    try:
        return score(Path(result["out_dir"]))
    except Exception as exc:  # noqa: BLE001 -- an older version's output this code cannot read is a finding
        result["trigger_error"] = f"{type(exc).__name__}: {exc}"[:500]
        return None


def grid(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """The audits in the order they run: per effort and source, the new code cold (it fills the control cache),
    the previous commit warm, the new code warm, then the baseline (no cache: cold)."""
    codes = ["new"] if args.no_baseline else args.code.split(",")
    if "previous" in codes and not args.previous_commit:
        raise SystemExit("--code previous needs --previous-commit")
    order = [("new", "cold"), ("previous", "warm"), ("new", "warm"), ("baseline", "cold")]
    return [(effort, source, code, cache) for effort in args.efforts.split(",") for source in args.sources.split(",")
            for code, cache in order if code in codes]


def demo_wall_s(args: argparse.Namespace) -> float | None:
    """``refine-audit demo`` end to end, in a child process on this tree."""
    if args.no_demo:
        return None
    out = args.work_dir / "demo"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "auditor.cli", "demo", "--out", str(out)],
                   env={**os.environ, "PYTHONPATH": str(TREE)}, check=True, capture_output=True)
    wall = time.perf_counter() - started
    if not (out / "planted_trigger.json").is_file():  # a command that did nothing must not pass for a fast demo
        raise RuntimeError(f"refine-audit demo wrote no planted_trigger.json under {out}")
    return wall


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    where = {**provenance(CPU, "bench.audit_cost"), "git_commit": git_commit()}  # the commit the run starts on
    settings = Settings.from_env()
    train, test = fashion_mnist(settings)
    torch.set_num_threads(args.threads)
    peaks = matmul_peaks()
    print(json.dumps({"matmul_peak_gflops": peaks}), flush=True)
    runs, details = finished_runs(args.out) if args.assemble else audits(args, train, test)
    payload: dict[str, Any] = {"runs": runs, "refine": refine_throughput(details, peaks, args.threads),
                               "demo_wall_s": None if args.assemble else demo_wall_s(args),
                               "load_average": os.getloadavg(), "cpu_flags": cpu_flags(),
                               "command": where["command"], "git_commit": where["git_commit"]}
    if args.assemble:
        payload = kept_from_the_run(args.out, payload)
    write_json(args.out, payload)
    print(json.dumps(payload["refine"], indent=1))
    print(f"{len(payload['runs'])} audits in {args.out}")


def kept_from_the_run(out: Path, assembled: dict[str, Any]) -> dict[str, Any]:
    """Assembling over a finished run's output keeps what only that run measured (the demo, its load, its
    command and commit) and records the assembling command beside it; the peaks, the REFINE section and its
    profile are measured again now."""
    if not out.is_file():
        return assembled
    run = json.loads(out.read_text())
    kept = {k: run[k] for k in ("demo_wall_s", "load_average", "command", "git_commit") if k in run}
    return {**assembled, **kept,
            "assembled": {"command": assembled["command"], "git_commit": assembled["git_commit"],
                          "load_average": assembled["load_average"]}}


def audits(args: argparse.Namespace, train: ImageSet,
           test: ImageSet) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every audit of the grid, on its code version: the rows and the workers' details."""
    subject = make_subject("badnets", train, test, epochs=args.subject_epochs, train_size=args.subject_train_size,
                           seed=args.seed, folder=args.work_dir / "subject", device=CPU, bf16=cpu_bf16_pays(CPU))
    trees, runs, details = {"new": TREE}, [], []
    for effort, source, code, cache in grid(args):
        if code == "baseline" and "baseline" not in trees:
            trees["baseline"] = checkout(args.baseline_tree, BASELINE_COMMIT)
        if code == "previous" and "previous" not in trees:
            trees["previous"] = checkout(Path(f"/tmp/previous-{args.previous_commit}"), args.previous_commit)
        row, detail = audit(subject, effort, source, code, cache, args, trees[code], test)
        runs.append(row)
        details.append(detail)
    return runs, details


def finished_runs(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and details ``audit`` saved, for a run stopped before its summary was written."""
    runs, details = [], []
    for path in sorted((out.with_suffix("") / "runs").glob("*.json")):
        saved = json.loads(path.read_text())
        row = {k: saved[k] for k in ("effort", "source", "controls", "cache", "code", "wall_s", "cpu_s", "stages",
                                     "ba_drop", "asr_after")}
        runs.append(row)
        details.append({**saved["detail"], **{k: row[k] for k in ("effort", "source", "code", "cache")}})
    return runs, details


if __name__ == "__main__":
    main()
