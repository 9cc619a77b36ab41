"""Markdown tables of the committed benchmark results, for README.

    python -m bench.tables
"""

from __future__ import annotations

import json

from bench.common import RESULTS, pct


def refine_table() -> str:
    data = json.loads((RESULTS / "refine_fmnist.json").read_text())
    rows = [
        "| attack | BA no defense | ASR no defense | BA REFINE | ASR REFINE | RA REFINE | agreement | attack train s | REFINE s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    default_epochs = data["config"]["train"]["epochs"]
    for e in data["attacks"]:
        b, a = e["no_defense"], e["refine"]
        epochs = e.get("train_epochs", default_epochs)
        name = e["attack"] if epochs == default_epochs else f"{e['attack']} ({epochs} training epochs)"
        rows.append(
            f"| {name} | {pct(b['ba'])} | {pct(b['asr'])} | {pct(a['ba'])} | {pct(a['asr'])} | {pct(a['ra'])} | "
            f"{pct(e['agreement_clean'])} | {e['attack_train_seconds']:.0f} | {e['refine_seconds']:.0f} |"
        )
    return "\n".join(rows)


def blackbox_table() -> str:
    data = json.loads((RESULTS / "blackbox_fmnist.json").read_text())
    rows = [
        "| attack | API output | queries used (planned: distil + refit + evaluate + probes) | agreement, clean test | "
        "API BA | API ASR | M∘API∘T BA | M∘API∘T ASR | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in data["runs"]:
        a, d = e["api"], e["defended"]
        rows.append(
            f"| {e['attack']} | {e['output']} | {e['queries_used']:,} ({e['queries_distill']:,} + {e['queries_refit']:,} + "
            f"{e['queries_evaluation']:,} + {e.get('queries_probes', 0):,}) | {pct(e['agreement_clean'])} | "
            f"{pct(a['ba'])} | {pct(a.get('asr'))} | {pct(d['ba'])} | {pct(d.get('asr'))} | {e.get('verdict', '—')} |"
        )
    if data.get("budget_curve"):
        model = data["budget_curve"][0].get("attack", "the first attack")
        rows.append(f"\nSurrogate agreement on clean test images against distillation queries ({model} model):\n")
        rows.append("| API output | queries | agreement |")
        rows.append("|---|---|---|")
        for p in data["budget_curve"]:
            rows.append(f"| {p['output']} | {p['queries']:,} | {pct(p['agreement_clean'])} |")
    return "\n".join(rows)


def suspicion_table() -> str:
    data = json.loads((RESULTS / "suspicion_fmnist.json").read_text())
    rows = ["| model | backdoored | attack | source | probed images | score [95% interval] | verdict |",
            "|---|---|---|---|---|---|---|"]
    for m in data["models"]:
        interval = m.get("interval") or {}
        span = f" [{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""
        rows.append(f"| {m['name']} | {'yes' if m['backdoored'] else 'no'} | {m.get('attack') or '—'} | "
                    f"{m.get('source', 'checkpoint')} | {m.get('probe_images', '—')} | {m['score']:.3f}{span} | "
                    f"{m.get('verdict', '—')} |")
    auc = data["roc_auc"]
    text = ", ".join(f"{k}: **{v:.3f}**" for k, v in auc.items()) if isinstance(auc, dict) else f"**{auc:.3f}**"
    rows.append(f"\nROC-AUC of the suspicion score: {text}")
    return "\n".join(rows)


def product_path_table() -> str:
    data = json.loads((RESULTS / "product_path.json").read_text())
    rows = ["| attack | effort | model | BA before / after | ASR before / after | surrogate agreement | verdict | "
            "gates tripped | audit s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        where = r["source"] if r["output"] is None else f"api, {r['output']}"
        if r["status"] != "succeeded":
            rows.append(f"| {r['attack']} | {r['effort']} | {where} | refused: {(r['error'] or {}).get('code')} | | | | | |")
            continue
        b, a = r["before"], r["after"]
        rows.append(f"| {r['attack']} | {r['effort']} | {where} | {pct(b['ba'])} / {pct(a['ba'])} | "
                    f"{pct(b.get('asr'))} / {pct(a.get('asr'))} | {pct(r['agreement_clean'])} | {r['verdict']} | "
                    f"{', '.join(r['gates_tripped']) or '—'} | {sum(r['seconds'].values()):.0f} |")
    return "\n".join(rows)


def api_load_line() -> str:
    d = json.loads((RESULTS / "api_load.json").read_text())
    return (
        f"{d['submissions']} concurrent submissions: {d['accepted']} accepted, {d['in_db']} in the database, "
        f"{d['enqueued']} enqueued, {d['lost']} lost, {d['duplicated']} duplicated; {d['polls']} polls; "
        f"submit p50/p99 {d['submit_p50_ms']:.0f}/{d['submit_p99_ms']:.0f} ms, poll p50/p99 "
        f"{d['poll_p50_ms']:.0f}/{d['poll_p99_ms']:.0f} ms, {d['throughput_rps']:.0f} requests/s "
        f"(gunicorn, {d['workers']} workers, load average {d.get('load_average_1m', 0):.1f} during the run)."
    )


if __name__ == "__main__":
    print(refine_table(), "\n")
    print(blackbox_table(), "\n")
    print(suspicion_table(), "\n")
    if (RESULTS / "product_path.json").exists():
        print(product_path_table(), "\n")
    print(api_load_line())
