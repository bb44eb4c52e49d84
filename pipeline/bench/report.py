"""The bench's table, targets, JSON line and MLflow run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .settings import TARGETS, WITHIN, BenchSettings, targets_for


def check_targets(out: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    goal = targets_for(out.get("settings", {}).get("device", "cpu"))
    for arch, fig in out.get("training", {}).items():
        if "train_speedup" in fig:
            targets[f"{arch}_train_speedup_3x"] = fig["train_speedup"] >= TARGETS["train_speedup"]
            targets[f"{arch}_accuracy_parity"] = bool(fig["parity"]["within_noise"])
        if "ours" in fig:
            targets[f"{arch}_data_fraction_below_10pct"] = fig["ours"]["data_fraction"] < TARGETS["data_fraction"]
    for arch, row in out.get("ceiling", {}).get("archs", {}).items():
        if "ours_fraction_of_peak" in row:
            name = f"{arch}_step_{round(goal['fraction_of_peak'] * 100)}pct_of_peak"
            targets[name] = row["ours_fraction_of_peak"] >= goal["fraction_of_peak"]
    if "memory" in out:
        targets["worker_peak_rss_below_2gb"] = out["memory"]["peak_rss_bytes"] < TARGETS["peak_rss_bytes"]
    if "inference" in out:
        targets["inference_ratio_80pct"] = out["inference"]["ratio"] >= TARGETS["inference_ratio"]
    if "search" in out:
        s = out["search"]
        targets["pruning_half_epochs"] = s["epoch_ratio"] <= TARGETS["search_epoch_ratio"]
        # The stricter reading: the pruned study must not lose the best trial on the way.
        targets["pruning_keeps_best_within_1pt"] = (s["with_pruning"]["final_best"]
                                                    >= s["without_pruning"]["final_best"] - WITHIN)
    targets["all_met"] = all(targets.values()) if targets else False
    return targets


def describe_settings(s: BenchSettings, machine: dict[str, Any]) -> str:
    return (f"bench: data {s.data_root}, image size {s.image_size or 'native'}, archs {','.join(s.archs)}, "
            f"{s.epochs} epochs, batch {s.batch_size}, max train {s.max_train or 'all'}, seed {s.seed}, "
            f"device {s.device}, our precision {s.precision}; search {s.search_trials} trials x "
            f"{s.search_epochs} epochs ({s.search_pruner} vs none, warm-up {s.search_warmup or 'preset'}); "
            f"skip {','.join(s.skip) or '-'}; "
            f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, load {machine['loadavg_start']}")


def describe_data(d: dict[str, Any]) -> str:
    return (f"data: {d['root']} ({d['layout']}), {d['height']}x{d['width']} px, train {d['train_used']} of "
            f"{d['train_total']}, validation {d['validation']}; uint8 cache built in {d['cache_build_seconds']:.2f}s, "
            f"loaded (hit) in {d['cache_load_seconds']:.2f}s")


def describe_training(arch: str, fig: dict[str, Any]) -> str:
    parts = [f"{arch}:"]
    if "reference" in fig:
        r = fig["reference"]
        parts.append(f"reference {r['train_images_per_second']:.1f} img/s train, {r['eval_images_per_second']:.1f} "
                     f"eval, best val {r['best_val_accuracy']:.3f};")
    if "ours" in fig:
        o = fig["ours"]
        parts.append(f"ours {o['train_images_per_second']:.1f} img/s train ({o['data_fraction']:.1%} data), "
                     f"{o['eval_images_per_second']:.1f} eval, best val {o['best_val_accuracy']:.3f}")
    if "train_speedup" in fig:
        parts.append(f"-> {fig['train_speedup']:.2f}x train, {fig['eval_speedup']:.2f}x eval")
    return " ".join(parts)


def describe_ceiling(c: dict[str, Any]) -> str:
    return (f"ceiling: matmul {c['matmul_size']}^3 fp32 {c['matmul_fp32_flops'] / 1e9:.1f} GFLOP/s, "
            f"bf16 {c['matmul_bf16_flops'] / 1e9:.1f} GFLOP/s")


def describe_inference(i: dict[str, Any]) -> str:
    return (f"inference: pyfunc {i['pyfunc_images_per_second']:.1f} img/s on PNG bytes, members raw "
            f"{i['members_raw_images_per_second']:.1f} img/s -> {i['ratio']:.1%}")


def describe_search(s: dict[str, Any]) -> str:
    p, n = s["with_pruning"], s["without_pruning"]
    return (f"search: epochs to within 1 pt of the final best: {s['pruner']} {p['epochs_to_within_1pt']} "
            f"(best {p['final_best']:.3f}, {p['total_epochs']} epochs in all), none {n['epochs_to_within_1pt']} "
            f"(best {n['final_best']:.3f}, {n['total_epochs']} in all) -> {s['epoch_ratio']:.2f}")


def describe_memory(m: dict[str, Any]) -> str:
    """The worker's peak, then where it goes: each phase's peak and what stays after it (MiB)."""
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    w = m["worker"]
    lines = [f"memory: tune worker on {m['dataset']} ({m['steps']} steps per member at batch {m['batch_size']}): "
             f"peak RSS {mib(w['VmHWM'])} MiB; at exit anonymous {mib(w['RssAnon'])}, file-backed "
             f"{mib(w['RssFile'])} ({w['seconds']:.0f} s)",
             f"  {'phase':<16}{'peak':>7}{'+start':>8}{'after':>7}{'anon':>7}{'file':>7}  (MiB; one process, "
             "import torch alone in its own)"]
    for name, r in m["phases"].items():
        lines.append(f"  {name:<16}{mib(r['peak']):>7}{mib(r['peak'] - r['start']) if r['start'] else '':>8}"
                     f"{mib(r['rss']):>7}{mib(r['anon']):>7}{mib(r['file']):>7}"
                     + ("  (cache cold: decoded here)" if r.get("cache_hit") == 0 else ""))
    return "\n".join(lines)


def describe_compile(c: dict[str, Any]) -> str:
    parts = []
    for arch, row in c["archs"].items():
        for mode in c["modes"]:
            f = row[mode]
            parts.append(f"{arch} {mode}: train {f['train_speedup']:.2f}x, eval {f['eval_speedup']:.2f}x after "
                         f"{f['first_steps_seconds']:.0f}s compiling (adopt: train {_fmt(f['adopt_train'])}, "
                         f"eval {_fmt(f['adopt_eval'])})")
    return "torch.compile vs eager: " + "; ".join(parts)


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def format_table(out: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    for arch, fig in out.get("training", {}).items():
        r, o = fig.get("reference", {}), fig.get("ours", {})
        def ratio(key: str, fig: dict = fig) -> str:
            return _fmt(fig.get(key), ".2f") + "x" if key in fig else "-"
        rows += [
            (f"{arch} train img/s (1 epoch)", _fmt(r.get("train_images_per_second")),
             _fmt(o.get("train_images_per_second")), ratio("train_speedup")),
            (f"{arch} eval img/s", _fmt(r.get("eval_images_per_second")), _fmt(o.get("eval_images_per_second")),
             ratio("eval_speedup")),
            (f"{arch} best val acc ({fig['epochs']} ep)", _fmt(r.get("best_val_accuracy"), ".3f"),
             _fmt(o.get("best_val_accuracy"), ".3f"),
             f"gap {fig['parity']['gap']:+.3f} (2se {fig['parity']['two_se']:.3f})" if "parity" in fig else "-"),
            (f"{arch} data time / epoch", "-", _fmt(o.get("data_fraction"), ".1%"), "target < 10%"),
        ]
    if "data" in out:
        d = out["data"]
        rows.append(("cache build / load s", "-", f"{d['cache_build_seconds']:.2f} / {d['cache_load_seconds']:.2f}",
                     f"{d['train_total']}+{d['validation']} images"))
    if "ceiling" in out:
        c = out["ceiling"]
        rows.append(("matmul GFLOP/s fp32 / bf16", "-",
                     f"{c['matmul_fp32_flops'] / 1e9:.1f} / {c['matmul_bf16_flops'] / 1e9:.1f}",
                     f"{c['matmul_size']}^3"))
        for arch, a in c["archs"].items():
            rows.append((f"{arch} train GFLOP/s (% of peak)",
                         f"{a['reference_flops'] / 1e9:.1f} ({a['reference_fraction_of_peak']:.1%} fp32)"
                         if "reference_flops" in a else "-",
                         f"{a['ours_flops'] / 1e9:.1f} ({a['ours_fraction_of_peak']:.1%} {a['ours_peak']})"
                         if "ours_flops" in a else "-",
                         f"{a['train_flops_per_image'] / 1e9:.3f} GFLOP/img"))
    if "memory" in out:
        m = out["memory"]
        train_peak = max(r["peak"] for name, r in m["phases"].items() if name.startswith("train "))
        rows.append(("tune worker peak RSS MiB", "-", f"{m['peak_rss_bytes'] / 2**20:.0f}",
                     f"target < {TARGETS['peak_rss_bytes'] / 2**20:.0f}; breakdown: training steps peak "
                     f"{train_peak / 2**20:.0f}"))
    for arch, row in out.get("compile", {}).get("archs", {}).items():
        for mode in out["compile"]["modes"]:
            f = row[mode]
            rows.append((f"{arch} compile {mode} train / eval img/s",
                         f"eager {row['eager']['train_images_per_second']:.1f} / "
                         f"{row['eager']['eval_images_per_second']:.1f}",
                         f"{f['train_images_per_second']:.1f} / {f['eval_images_per_second']:.1f}",
                         f"{f['train_speedup']:.2f}x / {f['eval_speedup']:.2f}x (adopt at >= 1.2x)"))
    if "inference" in out:
        i = out["inference"]
        rows.append(("ensemble predict img/s (PNG)", f"members raw {i['members_raw_images_per_second']:.1f}",
                     f"pyfunc {i['pyfunc_images_per_second']:.1f}", f"{i['ratio']:.1%} (target >= 80%)"))
    if "search" in out:
        s = out["search"]
        rows.append(("search epochs to within 1 pt", f"none {s['without_pruning']['epochs_to_within_1pt']}",
                     f"{s['pruner']} {s['with_pruning']['epochs_to_within_1pt']}",
                     f"{s['epoch_ratio']:.2f} (target <= 0.5)"))
        cross = s["pruned_epochs_to_within_1pt_of_unpruned_best"]
        rows.append(("  ... to within 1 pt of unpruned best", f"none {s['without_pruning']['epochs_to_within_1pt']}",
                     f"{s['pruner']} {cross if cross is not None else 'never'}",
                     _fmt(s["cross_epoch_ratio"], ".2f")))
        rows.append(("search final best / all epochs",
                     f"{s['without_pruning']['final_best']:.3f} / {s['without_pruning']['total_epochs']}",
                     f"{s['with_pruning']['final_best']:.3f} / {s['with_pruning']['total_epochs']}",
                     f"{s['total_epoch_ratio']:.2f}"))
    header = ("figure", "reference / baseline", "ours", "ratio / note")
    widths = [max(len(str(row[k])) for row in [header, *rows]) for k in range(4)]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    targets = ", ".join(f"{k}={_fmt(v)}" for k, v in out["targets"].items())
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows),
                      f"targets: {targets}",
                      "seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in out["section_seconds"].items()),
                      f"bench took {out['seconds']:.0f}s; load average "
                      f"{out['machine']['loadavg_start']} at start, {out['machine']['loadavg_end']} at end "
                      "(figures taken on a busy machine are noisy)"])


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.generic):
        return finite(value.item())
    return value


def flat_figures(value: Any, prefix: str = "") -> dict[str, float]:
    """Every number in ``out`` as ``section.key`` -> float (booleans as 0/1), for MLflow metrics."""
    flat: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            flat.update(flat_figures(v, f"{prefix}{k}."))
    elif isinstance(value, (bool, int, float)) and not isinstance(value, str):
        if math.isfinite(float(value)):
            flat[prefix[:-1]] = float(value)
    return flat


def log_bench_run(out: dict[str, Any], experiment: str) -> str:
    """The bench as one MLflow run: settings as params, every figure as a metric, the JSON as an artifact."""
    from .. import tracking

    client = tracking.client()
    run_id, _ = tracking.open_run(client, experiment, "bench", tags={"kind": "bench"})  # `mlflow run`'s, or new
    tracking.log_params(client, run_id, {f"bench.{k}": v for k, v in out["settings"].items()})
    tracking.log_metrics(client, run_id, flat_figures({k: v for k, v in out.items() if k != "settings"}))
    client.log_dict(run_id, finite(out), "bench.json")
    tracking.end_run(client, run_id, "FINISHED")
    return run_id
