"""The defended endpoint against the model API it defends: accuracy, backdoor, latency, throughput.

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python -m bench.defended_endpoint [--effort quick] [--query-budget 20000]

Everything runs through the product's command line, as a user would:

1. ``refine-audit attack badnets`` makes a backdoored Fashion-MNIST model (skipped when
   ``--model-dir`` already holds one);
2. ``refine-audit serve-model`` serves it over KServe v1 and OIP v2 (probabilities);
3. ``refine-audit audit --api …`` audits it over v1 at ``--effort`` within ``--query-budget``
   (no positive controls: they prove the defense on other models and cost time, not
   queries; the bar here is about this model);
4. ``refine-audit serve-defended`` serves the audit's defense in front of the model
   server, once per protocol.

Then, per protocol, one run measures both URLs the same way: BA on the Fashion-MNIST
test set and ASR on its BadNets-triggered copy (images not of the target class), and
single-image requests — sequential for latency (p50/p99, the two URLs interleaved so
they share the machine's load) and from ``--concurrency`` clients for throughput.
Writes ``bench/results/defended_endpoint.json`` in the issue's shape; the audit's own
settings and figures go to ``bench/results/defended_endpoint/audit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import requests
import torch

from auditor.attacks import load_attack
from auditor.data import ImageSet, load_fashion_mnist, take
from auditor.evaluation import attack_metrics
from bench.common import RESULTS, git_commit, write_json

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from e2e.processes import (  # noqa: E402
    BIN,
    ServiceProcess,
    answers_ok,
    free_port,
    service_env,
    start_process,
    wait_for,
)

OUT = RESULTS / "defended_endpoint.json"
AUDIT_OUT = RESULTS / "defended_endpoint" / "audit.json"
PROTOCOLS = ("v1", "v2")
STARTUP_S = 180
EVAL_BATCH = 100  # images per request when measuring BA/ASR




def predict_path(protocol: str) -> str:
    return "/v1/models/model:predict" if protocol == "v1" else "/v2/models/model/infer"


def http_predictor(url: str, protocol: str, session: requests.Session) -> Callable[[torch.Tensor], torch.Tensor]:
    """Top-1 labels from a v1/v2 URL for float images (N, C, H, W): what a client of either URL sees."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if protocol == "v1":
            body: dict[str, Any] = {"instances": x.tolist()}
        else:
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
        response = session.post(url, json=body, timeout=120)
        response.raise_for_status()
        answer = response.json()
        if protocol == "v1":
            values = torch.tensor(answer["predictions"])
        else:
            out = answer["outputs"][0]
            values = torch.tensor(out["data"]).reshape(out["shape"])
        return values.argmax(1) if values.dim() == 2 else values.long()

    return predict


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_ms(urls: dict[str, str], protocol: str, images: torch.Tensor, requests_each: int) -> dict[str, list[float]]:
    """Sequential single-image requests, alternating between the URLs so both see the same load."""
    sessions = {name: requests.Session() for name in urls}
    predictors = {name: http_predictor(url, protocol, sessions[name]) for name, url in urls.items()}
    timings: dict[str, list[float]] = {name: [] for name in urls}
    for i in range(requests_each):
        image = images[i % len(images)].unsqueeze(0)
        for name, predict in predictors.items():
            started = time.perf_counter()
            predict(image)
            timings[name].append(1000 * (time.perf_counter() - started))
    return timings


def throughput_rps(url: str, protocol: str, images: torch.Tensor, total: int, concurrency: int) -> float:
    """Single-image requests from ``concurrency`` clients; completed requests per second of wall time."""

    def client(worker: int) -> int:
        predict = http_predictor(url, protocol, requests.Session())
        done = 0
        for i in range(worker, total, concurrency):
            predict(images[i % len(images)].unsqueeze(0))
            done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = sum(pool.map(client, range(concurrency)))
    return done / (time.perf_counter() - started)


def cli(*args: str, env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as handle:
        subprocess.run([str(BIN / "refine-audit"), *args], env=env, stdout=handle, stderr=subprocess.STDOUT, check=True,
                       stdin=subprocess.DEVNULL)


def ensure_backdoored_model(model_dir: Path, env: dict[str, str], work: Path) -> Path:
    if not (model_dir / "model.pt").is_file():
        cli("attack", "badnets", "--out", str(model_dir), "--epochs", "4", env=env, log=work / "attack.log")
    return model_dir / "model.pt"




def run_audit(upstream: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> Path:
    """The product's black-box audit of the served model; returns the audit's output folder."""
    audit_dir = work / f"audit-{args.effort}-{args.query_budget}-{args.test_size}"
    if (audit_dir / "out" / "defense.json").is_file():
        return audit_dir / "out"
    cli("audit", "--api", upstream + predict_path("v1"), "--protocol", "v1", "--effort", args.effort,
        "--query-budget", str(args.query_budget), "--test-size", str(args.test_size), "--attacks", "",
        "--allow-host", "127.0.0.1", "--out", str(audit_dir), "--quiet", env=env, log=work / "audit.log")
    return audit_dir / "out"


def start_defended(upstream: str, defense: Path, protocol: str, env: dict[str, str], work: Path) -> tuple[ServiceProcess, str]:
    port = free_port()
    process = start_process(
        f"serve-defended-{protocol}",
        [str(BIN / "refine-audit"), "serve-defended", "--upstream", upstream + predict_path(protocol),
         "--defense", str(defense), "--protocol", protocol, "--allow-host", "127.0.0.1", "--port", str(port)],
        env, work / f"serve-defended-{protocol}.log",
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers_ok(url + "/readyz"), STARTUP_S, interval=0.5, message=f"serve-defended {protocol}", process=process)
    return process, url


def measure(protocol: str, urls: dict[str, str], test: ImageSet, triggered: ImageSet, target: int,
            args: argparse.Namespace) -> dict[str, Any]:
    entry: dict[str, Any] = {"protocol": protocol}
    session = requests.Session()
    for name, url in urls.items():
        metrics = attack_metrics(_batched(http_predictor(url, protocol, session)), test, triggered, target)
        entry[f"ba_{name}"], entry[f"asr_{name}"] = metrics.ba, metrics.asr
        print(f"{protocol} {name}: BA {metrics.ba:.4f} ASR {metrics.asr:.4f}", flush=True)
    images = test.x[: args.latency_requests].float() / 255
    timings = latency_ms(urls, protocol, images, args.latency_requests)
    for name, url in urls.items():
        rps = throughput_rps(url, protocol, images, args.throughput_requests, args.concurrency)
        entry[name] = {"p50_ms": round(statistics.median(timings[name]), 3),
                       "p99_ms": round(percentile(timings[name], 0.99), 3), "rps": round(rps, 2)}
        print(f"{protocol} {name}: {entry[name]}", flush=True)
    return {key: entry[key] for key in ("protocol", "upstream", "defended", "ba_upstream", "ba_defended",
                                        "asr_upstream", "asr_defended")}


def _batched(predict: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.cat([predict(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/refine-audit-bench-defended"))
    parser.add_argument("--model-dir", type=Path, default=None, help="A `refine-audit attack badnets` output folder.")
    parser.add_argument("--effort", default="quick", choices=["tiny", "quick", "standard", "thorough"])
    parser.add_argument("--query-budget", type=int, default=20_000)
    parser.add_argument("--test-size", type=int, default=2000, help="The audit's test images (its evaluation queries).")
    parser.add_argument("--eval-images", type=int, default=10_000, help="Test images for BA/ASR through both URLs.")
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--throughput-requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    commit = git_commit()  # the code that runs, not whatever is checked out when the run ends
    args.work.mkdir(parents=True, exist_ok=True)
    env = service_env({"OMP_NUM_THREADS": "1"})
    model = ensure_backdoored_model(args.model_dir or args.work / "badnets", env, args.work)
    train_unused, test = load_fashion_mnist()
    del train_unused
    test = take(test, args.eval_images, seed=0)
    attack = load_attack(model.parent)
    triggered = attack.triggered_test(test)

    port = free_port()
    started: list[ServiceProcess] = []
    try:
        server = start_process("serve-model", [str(BIN / "refine-audit"), "serve-model", str(model), "--protocol", "both",
                                               "--port", str(port)], env, args.work / "serve-model.log")
        started.append(server)
        upstream = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers_ok(upstream + "/v2/health/ready"), STARTUP_S, interval=0.5, message="serve-model", process=server)
        defense = run_audit(upstream, args, env, args.work)
        results = []
        for protocol in PROTOCOLS:
            process, defended = start_defended(upstream, defense, protocol, env, args.work)
            started.append(process)
            urls = {"upstream": upstream + predict_path(protocol), "defended": defended + predict_path(protocol)}
            results.append(measure(protocol, urls, test, triggered, attack.target, args))
    finally:
        for process in started:
            process.stop()
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.defended_endpoint", *sys.argv[1:]])
    write_json(OUT, {"protocols": results, "command": command, "git_commit": commit})
    report = json.loads((defense / "report.json").read_text())
    write_json(AUDIT_OUT, {
        "effort": args.effort, "query_budget": args.query_budget, "test_size": args.test_size, "attacks": [],
        "queries": report.get("queries"), "utility": {k: report["utility"][k] for k in ("ba_before", "ba_after", "agreement")},
        "surrogate_agreement": (report.get("surrogate") or {}).get("agreement_clean"),
        "verdict": report.get("verdict"), "timings": report.get("timings"), "eval_images": args.eval_images,
        "load_average": os.getloadavg(), "command": command, "git_commit": commit,
    })
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
