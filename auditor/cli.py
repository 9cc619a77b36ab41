"""The ``refine-audit`` command line. (Over 400 lines: the ``audit`` command's options and their mapping onto the spec, one screen per command.)"""

from __future__ import annotations

import functools
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from auditor.errors import INPUT_ERRORS, AuditError, ErrorCode

EXIT_INVALID_INPUT = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 130


class StageBars:
    """One tqdm bar per stage, fed by ``on_progress(stage, done, total)``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:<14}", unit="step", leave=True, dynamic_ncols=True)
        if done >= total and bar.total and bar.total > total:  # a stage's closing (1, 1) after finer steps
            done = total = bar.total
        bar.total = total
        bar.update(done - bar.n)  # update() honours tqdm's mininterval; a redraw per batch is wasted work

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def fail(exc: AuditError) -> None:
    click.secho(f"error [{exc.code.value}]: {exc.message}", fg="red", err=True)
    sys.exit(EXIT_INVALID_INPUT if exc.is_input_error else EXIT_FAILED)


def load_settings() -> Any:
    """The process's one ``Settings`` (device, allowlist, data folders); a bad variable exits with its name."""
    from auditor.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        click.secho(f"error [invalid_settings]: {exc}", fg="red", err=True)
        sys.exit(EXIT_INVALID_INPUT)


class LazyGroup(click.Group):
    """Loads the service commands (Flask, Celery) only when one of them runs, so `audit` starts fast."""

    lazy = {
        "serve": "web.cli:serve",
        "user": "web.cli:user",
        "token": "web.cli:token",
        "db": "web.cli:db",
        "worker": "worker.cli:worker_command",
        "remote": "auditor.remote_cli:remote",
        "serve-defended": "auditor.deploy.cli:serve_defended",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="refine-audit")
def main() -> None:
    """refine-audit: find and disable backdoors in image classifiers with REFINE.

    \b
    Quick start:
      refine-audit attack badnets --out models/badnets   # a backdoored model to try
      refine-audit audit models/badnets/model.pt         # audit it: report in out/audit
      refine-audit serve                                 # web portal + REST API on :8000

    Every command has its own --help.
    """


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True, help="Folder for the model, the audit and its report.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: Path, seed: int) -> None:
    """Plant a BadNets backdoor in a Fashion-MNIST model, audit it end to end, print the verdict.

    Also prints the planted trigger's BA/ASR before and after REFINE, which the
    audit itself cannot know.
    """
    from auditor.demo import run_demo

    bars = StageBars()
    settings = load_settings()
    with CancelOnInterrupt() as cancel:
        try:
            result, planted = run_demo(out, settings, seed=seed, on_progress=bars, should_cancel=cancel)
        except AuditError as exc:
            bars.close()
            fail(exc)
    bars.close()
    if "no_defense" in planted:
        b, a = planted["no_defense"], planted["refine"]
        click.echo("")
        click.echo(f"planted BadNets trigger   {'BA':>7}{'ASR':>7}")
        click.echo(f"  no defense              {b['ba']:>7.1%}{b['asr']:>7.1%}")
        click.echo(f"  REFINE                  {a['ba']:>7.1%}{a['asr']:>7.1%}")
        click.echo(f"demo took {planted['seconds']:.0f} s")
    _print_outcome(result)


@main.command()
@click.argument("name", type=click.Choice(sorted(__import__("auditor.attacks", fromlist=["ATTACKS"]).ATTACKS)))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for model.pt (TorchScript), model.safetensors and attack.json.")
@click.option("--epochs", type=int, default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--target", type=int, default=0, show_default=True, help="Class the trigger sends images to.")
def attack(name: str, out: Path, epochs: int, seed: int, target: int) -> None:
    """Generate a backdoored Fashion-MNIST model to try the service with."""
    from auditor.attacks import AttackConfig, train_backdoored_model
    from auditor.data import load_fashion_mnist
    from auditor.evaluation import attack_metrics, model_predictor
    from auditor.models import ArchConfig, export_torchscript
    from auditor.runtime import cpu_bf16_pays, resolve_device
    from auditor.training import TrainConfig

    settings = load_settings()
    device = resolve_device(settings.device)
    bars = StageBars()
    try:
        train, test = load_fashion_mnist(settings.fmnist_dir, settings.data_dir)
    except AuditError as exc:
        fail(exc)
    bd = train_backdoored_model(
        ArchConfig("small_cnn"), train, test, AttackConfig(name, target=target, seed=seed),
        TrainConfig(epochs=epochs, bf16=cpu_bf16_pays(device)), device=device, seed=seed, on_progress=bars,
    )
    bars.close()
    bd.save(out)
    export_torchscript(bd.model, test.x[:2].float() / 255, out / "model.pt")
    m = attack_metrics(model_predictor(bd.model, device), test, bd.poisoned_test, target)
    click.echo(f"{name}: BA {m.ba:.1%}, ASR {m.asr:.1%} -> {out}/model.pt")


class CancelOnInterrupt:
    """First Ctrl-C asks the audit to stop at the next batch; a second one exits at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "CancelOnInterrupt":
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        click.secho("\ncancelling after the current batch (Ctrl-C again to abort now)...", fg="yellow", err=True)

    def __call__(self) -> bool:
        return self.requested


def _build_spec(options: dict[str, Any]) -> dict[str, Any]:
    """Command-line options layered over an optional --spec file."""
    raw: dict[str, Any] = json.loads(Path(options["spec"]).read_text()) if options["spec"] else {}
    def section(name: str) -> dict[str, Any]:
        return raw.setdefault(name, {})
    if options["api"]:
        model = section("model")
        model["source"] = "api"
        api = model.setdefault("api", {})
        api.update({"url": options["api"], "protocol": options["protocol"], "output": options["output"]})
        for key in ("model_name", "query_budget", "auth_header"):
            if options[key] is not None:
                api[key] = options[key]
        if options["auth_env"]:
            import os

            if options["auth_env"] not in os.environ:
                raise click.BadParameter(f"environment variable {options['auth_env']} is not set", param_hint="--auth-env")
            api["auth_value"] = os.environ[options["auth_env"]]
    if options["mlflow"]:
        mlflow = section("model").setdefault("mlflow", {})
        mlflow["uri"] = options["mlflow"]
        if options["mlflow_path"]:
            mlflow["path"] = options["mlflow_path"]
        if options["no_write_back"]:
            mlflow["write_back"] = False
    if options["arch"]:
        section("model")["architecture"] = {"name": options["arch"], **({"width": options["width"]} if options["width"] else {})}
    if options["data"] != "fashion-mnist":
        section("data")["source"] = "upload"
    if options["attacks"] is not None:
        section("controls")["attacks"] = [a for a in options["attacks"].split(",") if a]
    for key, (where, field) in {"refine_epochs": ("refine", "epochs"), "train_size": ("data", "train_size"),
                                "test_size": ("data", "test_size"), "control_epochs": ("controls", "train_epochs")}.items():
        if options[key] is not None:
            section(where)[field] = options[key]
    for key in ("effort", "seed"):
        if options[key] is not None:
            raw[key] = options[key]
    return raw


@main.command()
@click.argument("model", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--api", metavar="URL", help="Audit a model behind a prediction API instead of a checkpoint file.")
@click.option("--protocol", type=click.Choice(["v1", "v2", "json"]), default="v1", show_default=True, help="v1: KServe/TF-Serving; v2: Open Inference Protocol.")
@click.option("--output", type=click.Choice(["auto", "probabilities", "logits", "labels"]), default="auto", show_default=True, help="What the API answers.")
@click.option("--model-name", default=None, help="Model name in the API's URL (v1/v2).")
@click.option("--query-budget", type=int, default=None, help="Hard cap on images sent to the API [default: 30000].")
@click.option("--auth-header", default=None, help="Header carrying the API secret, e.g. Authorization.")
@click.option("--auth-env", default=None, metavar="VAR", help="Environment variable holding that header's value.")
@click.option("--mlflow", metavar="URI", help="Audit a checkpoint from the MLflow tracking server (REFINE_AUDIT_MLFLOW_TRACKING_URI): models:/NAME/VERSION or runs:/RUN_ID/PATH.")
@click.option("--mlflow-path", metavar="PATH", help="The checkpoint file inside those artifacts [default: the one file with a checkpoint extension].")
@click.option("--no-write-back", is_flag=True, help="Do not tag the MLflow model version or log the report to its run.")
@click.option("--allow-host", multiple=True, help="Allow an API host the SSRF guard would refuse (e.g. 127.0.0.1).")
@click.option("--data", default="fashion-mnist", show_default=True, help="fashion-mnist, or a .npz (x, optional y) / zip of class folders.")
@click.option("--arch", type=click.Choice(["small_cnn", "resnet18"]), default=None, help="Architecture of bare weights (safetensors without metadata, state dicts).")
@click.option("--width", type=int, default=None, help="small_cnn width of those weights.")
@click.option("--attacks", default=None, help="Positive controls, comma-separated [default: badnets,blended]; '' for none.")
@click.option("--effort", type=click.Choice(["tiny", "quick", "standard", "thorough"]), default=None, help="Time/quality trade-off [default: standard].")
@click.option("--refine-epochs", type=int, default=None)
@click.option("--control-epochs", type=int, default=None, help="Epochs for the backdoored reference models.")
@click.option("--train-size", type=int, default=None, help="Cap on unlabeled pool images.")
@click.option("--test-size", type=int, default=None, help="Cap on test images.")
@click.option("--seed", type=int, default=None)
@click.option("--spec", type=click.Path(exists=True, dir_okay=False), default=None, help="A JSON audit spec; options above override it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/audit"), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--no-sandbox", is_flag=True,
              help="Run the model in this process, with your rights and environment [default: a bubblewrap sandbox when it works].")
@click.option("--plan", "plan_only", is_flag=True, help="Print the resolved plan and its time estimate, then exit without training.")
def audit(model: Path | None, out: Path, allow_host: tuple[str, ...], quiet: bool, device: str | None,
          no_sandbox: bool, plan_only: bool, **options: Any) -> None:
    """Audit a model: find backdoor evidence, train REFINE, prove it on generated attacks, write a report.

    \b
    Examples:
      refine-audit audit model.pt
      refine-audit audit model.pt --plan          # what it would run, and how long it should take
      refine-audit audit weights.safetensors --arch small_cnn --data mydata.npz
      refine-audit audit --api http://127.0.0.1:9000/v1/models/m:predict --output labels --allow-host 127.0.0.1
      refine-audit audit --mlflow models:/classifier/3   # from MLflow; verdict tags and report written back

    The model runs in a bubblewrap sandbox (no network for checkpoints, none of your files or
    environment) when bwrap works here; otherwise, or with --no-sandbox, it runs in this
    process and a warning says so.

    Exit status: 0 succeeded, 2 invalid input, 3 failed, 130 cancelled.
    """
    from auditor.pipeline import AuditInputs
    from auditor.spec import parse_spec

    settings = load_settings()
    options["data"] = options["data"] or "fashion-mnist"
    try:
        if model is None and not options["api"] and not options["mlflow"]:
            raise click.UsageError("name a MODEL file, an --api URL or an --mlflow reference")
        if options["mlflow"] and (model is not None or options["api"]):
            raise click.UsageError("--mlflow names the model: give no MODEL file or --api with it")
        spec = parse_spec(_build_spec(options))
    except AuditError as exc:
        fail(exc)
    dataset = None if options["data"] == "fashion-mnist" else Path(options["data"])
    if dataset is not None and not dataset.is_file():
        fail(AuditError(ErrorCode.DATASET_NOT_FOUND, f"Dataset file {dataset} does not exist."))
    if plan_only:
        _print_plan(spec, dataset, device or settings.device)
        return
    inputs = AuditInputs(
        work_dir=out, model_path=model, dataset_path=dataset, allowed_hosts=(*settings.allowed_hosts, *allow_host),
        device=device or settings.device, fmnist_dir=settings.fmnist_dir, cache_dir=settings.data_dir,
    )
    runner = _with_control_cache(settings, _audit_runner(settings, no_sandbox))
    bars = StageBars(enabled=not quiet)
    with CancelOnInterrupt() as cancel:
        result = runner(spec, inputs, bars, cancel)
    bars.close()
    _print_outcome(result)


def _with_control_cache(settings: Any, runner: Any) -> Any:
    """Positive controls reused from (and published to) the artifact store, unless REFINE_AUDIT_CONTROL_CACHE=off."""
    if not settings.control_cache:
        return runner
    from auditor.store.artifacts import store_from_url
    from auditor.store.control_cache import run_with_control_cache

    try:
        store = store_from_url(settings.artifacts_url, settings)
    except Exception as exc:  # noqa: BLE001 -- an unreachable store means training the controls, as before
        click.secho(f"control cache unavailable ({exc}); positive controls will be trained", fg="yellow", err=True)
        return runner
    return functools.partial(run_with_control_cache, runner, store)


def _audit_runner(settings: Any, no_sandbox: bool) -> Any:
    """The sandboxed runner when bwrap works; the in-process one, announced on stderr, otherwise."""
    from auditor.pipeline import run_audit
    from auditor.sandbox import SandboxUnavailable, audit_runner

    def warn(message: str) -> None:
        click.secho(message, fg="yellow", err=True)

    if no_sandbox:
        from auditor.registry.source import mlflow_config, registry_runner

        warn("WARNING: --no-sandbox: the model runs in this process, with your rights, files and environment.")
        return registry_runner(run_audit, mlflow_config(settings))
    try:
        return audit_runner(settings, warn)
    except SandboxUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def _print_plan(spec: Any, dataset: Path | None, device: str) -> None:
    """``audit --plan``: every number the audit would run with and the time it should take; nothing is trained."""
    from auditor.pipeline import plan_audit
    from auditor.pipeline.data import data_summary
    from auditor.pipeline.describe import describe_plan
    from auditor.runtime import resolve_device

    try:
        plan = plan_audit(spec, data_summary(spec, dataset), device=resolve_device(device))
    except AuditError as exc:
        fail(exc)
    width = max(len(label) for label, _ in describe_plan(plan))
    for label, value in describe_plan(plan):
        click.echo(f"{label:<{width}}  {value}")


def _print_outcome(result: Any) -> None:
    report_dir = result.out_dir
    if result.status == "succeeded":
        summary = result.summary
        colour = {"likely_backdoored": "red", "suspicious": "yellow", "inconclusive": "yellow"}.get(
            summary.get("verdict"), "green")
        click.secho(f"verdict: {summary.get('verdict')} - {summary.get('headline')}", fg=colour, bold=True)
        intervals = summary.get("intervals", {})
        if summary.get("ba_before") is not None:
            click.echo(f"benign accuracy: {_figure(summary['ba_before'], intervals.get('ba_before'))} -> "
                       f"{_figure(summary['ba_after'], intervals.get('ba_after'))} with REFINE")
        if "controls_asr_before" in summary:
            click.echo(f"positive controls, worst ASR: {summary['controls_asr_before']:.1%} -> {summary['controls_asr_after']:.1%}")
        if "trigger_class" in summary:
            where = " (on the surrogate)" if summary["trigger_model"] == "surrogate" else ""
            click.echo(f"trigger search{where}: class {summary['trigger_class']}, anomaly index "
                       f"{summary['trigger_anomaly_index']:.1f}, success "
                       f"{_figure(summary['trigger_success'], intervals.get('trigger_success'))}, "
                       f"recovered: {'yes' if summary['trigger_recovered'] else 'no'}")
        if summary.get("gates_tripped"):
            click.echo(f"gates tripped: {', '.join(summary['gates_tripped'])}")
        click.echo(f"defended model fit to deploy: {'yes' if summary.get('fit_to_deploy') else 'no'}")
        click.echo(f"report: {report_dir / 'report.html'} (also report.pdf, report.json)")
        return
    error = result.error or {}
    click.secho(f"{result.status} [{error.get('code')}]: {error.get('message')}", fg="red", err=True)
    if result.report is not None:
        click.echo(f"report: {report_dir / 'report.json'}", err=True)
    if result.status == "cancelled":
        sys.exit(EXIT_CANCELLED)
    code = ErrorCode(error.get("code", "internal_error"))
    sys.exit(EXIT_INVALID_INPUT if code in INPUT_ERRORS else EXIT_FAILED)


def _figure(value: float, interval: dict[str, Any] | None) -> str:
    """``89.4% [88.2, 90.6] n=2,401``: a share with its 95% interval and sample size."""
    if not interval:
        return f"{value:.1%}"
    return f"{value:.1%} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}] n={interval['n']:,}"


@main.command()
@click.argument("report_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for the new HTML/PDF [default: beside the JSON].")
def report(report_json: Path, out: Path | None) -> None:
    """Re-render report.html and report.pdf from a report.json (and the PNGs beside it)."""
    from auditor.report import rerender
    from auditor.report.schema import ReportValidationError

    try:
        written = rerender(report_json, out)
    except ReportValidationError as exc:
        click.secho(str(exc), fg="red", err=True)
        sys.exit(EXIT_INVALID_INPUT)
    for name in ("report.html", "report.pdf"):
        click.echo(written[name])


@main.command("serve-model")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--protocol", type=click.Choice(["v1", "v2", "both"]), default="both", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback by default; the server has no authentication.")
@click.option("--port", type=int, default=9000, show_default=True)
@click.option("--labels-only", is_flag=True, help="Answer top-1 labels instead of probabilities.")
@click.option("--model-name", default="model", show_default=True)
@click.option("--arch", type=click.Choice(["small_cnn", "resnet18"]), default=None, help="For bare weights without metadata.")
def serve_model(model: Path, protocol: str, host: str, port: int, labels_only: bool, model_name: str, arch: str | None) -> None:
    """Serve a checkpoint over KServe v1 and/or Open Inference Protocol v2 (a black-box target to audit)."""
    from auditor.blackbox import run_server
    from auditor.models import ArchConfig, load_checkpoint

    try:
        loaded = load_checkpoint(model, arch=ArchConfig(arch) if arch else None)
    except AuditError as exc:
        fail(exc)
    click.echo(f"serving {model.name} ({loaded.format}) on http://{host}:{port} "
               f"[v1: /v1/models/{model_name}:predict, v2: /v2/models/{model_name}/infer]")
    run_server(loaded.module, host, port, protocol, labels_only, model_name)


if __name__ == "__main__":  # python -m auditor.cli, as the benchmarks run it
    main()
