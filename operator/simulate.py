"""`baton simulate`: replay a request trace through the autoscaling policy and a queueing
model of the pools, and compare with the smallest static fleet that meets the same targets.

    baton simulate --model examples/traces/model.yaml --trace examples/traces/surging.csv \\
        --out surging.json --plot surging.png [--profile profile.json] [--startup-seconds 90]

The JSON holds ttft_slo_attainment and itl_slo_attainment (shares of requests within the
Model's targets), gpu_hours and cost (from costPerHour) of the autoscaled run, and "static"
with the same keys (plus the fleet) for the smallest fixed fleet meeting both attainment
targets in the same simulator. The plot shows load, replicas per role and pool, and latency
over time. The model of the pools is described in baton.operator.autoscaler.simulator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from baton.operator.autoscaler.policy import ROLES
from baton.operator.autoscaler.profile import load_profile
from baton.operator.autoscaler.simulator import MIN_STARTUP_SECONDS, RunResult, Simulator, Trace
from baton.operator.spec import SpecError, load_model_file

__all__ = ["main", "simulate", "plot"]


def simulate(model_path: str | Path, trace_path: str | Path,
             profile_path: str | Path | None = None,
             startup_seconds: float = MIN_STARTUP_SECONDS) -> tuple[dict, RunResult]:
    """Runs the autoscaled replay and the static search; returns (report, autoscaled run)."""
    model, _ = load_model_file(model_path)
    profile = load_profile(profile_path)
    trace = Trace.load_csv(trace_path)
    sim = Simulator(model.spec, profile, trace, startup_seconds=startup_seconds)
    started = time.perf_counter()
    initial = sim.initial_fleet()
    run = sim.run(initial, autoscale=True)
    fleet, static, static_ok = sim.search_static()
    targets = model.spec.autoscaling.targets
    peak: dict[str, dict[str, int]] = {role: {} for role in ROLES}
    for replicas in [initial] + run.timeline["replicas"]:
        for role in ROLES:
            for pool, n in replicas[role].items():
                peak[role][pool] = max(peak[role].get(pool, 0), n)
    report = {
        "model": f"{model.namespace}/{model.name}",
        "trace": Path(trace_path).name,
        "requests": int(len(trace.time_s)),
        "duration_s": trace.duration,
        "targets": {"time_to_first_token_seconds": targets.time_to_first_token_seconds,
                    "inter_token_latency_seconds": targets.inter_token_latency_seconds,
                    "attainment": targets.attainment},
        "profile": profile.to_dict(),
        "profile_source": str(profile_path) if profile_path else "default (H100 roofline "
                          "estimate, baton.operator.autoscaler.profile)",
        "startup_seconds": startup_seconds,
        **run.summary(),
        "meets_targets": bool(run.ttft_slo_attainment >= targets.attainment
                              and run.itl_slo_attainment >= targets.attainment),
        "gpu_hours_vs_static": round(run.gpu_hours / static.gpu_hours, 4),
        "decisions": run.decisions,
        "scale_events": run.scale_events,
        "initial_fleet": initial,
        "peak_fleet": peak,
        "static": {**static.summary(), "fleet": fleet, "meets_targets": static_ok},
        "timeline": {
            "time_s": run.timeline["time"],
            "request_rate": [round(v, 3) for v in run.timeline["request_rate"]],
            "replicas": run.timeline["replicas"],
            "reason": run.timeline["reason"],
        },
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    return report, run


def plot(report: dict, run: RunResult, path: str | Path) -> None:
    """Load, replicas per role and pool (static fleet dashed), and windowed p95 latency
    against the targets, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = run.timeline
    minutes = [t / 60 for t in tl["time"]]
    # the fleet from t = 0 until the first decision
    fleet_minutes = [0.0] + minutes
    fleets = [report["initial_fleet"]] + tl["replicas"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    ax = axes[0]
    ax.plot(minutes, tl["request_rate"], color="black", label="requests/s")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot(minutes, [v / 1000 for v in tl["prompt_tokens_per_second"]], color="tab:gray",
             alpha=0.6, label="prompt ktokens/s")
    ax2.set_ylabel("prompt ktokens/s")
    ax.set_title(f"{report['model']} on {report['trace']}: autoscaled "
                 f"{report['gpu_hours']:.1f} GPU-h vs static {report['static']['gpu_hours']:.1f}"
                 f" ({100 * report['gpu_hours_vs_static']:.0f}%); attainment TTFT "
                 f"{report['ttft_slo_attainment']:.3f}, ITL {report['itl_slo_attainment']:.3f}")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    for ax, role in zip(axes[1:3], ROLES):
        pools = list(report["static"]["fleet"][role])
        series = [[r[role][p] for r in fleets] for p in pools]
        ax.stackplot(fleet_minutes, *series, labels=[f"{role} {p}" for p in pools], step="post",
                     alpha=0.8)
        ax.axhline(sum(report["static"]["fleet"][role].values()), color="black",
                   linestyle="--", label=f"static fleet ({report['static']['fleet'][role]})")
        ax.set_ylabel(f"{role} replicas")
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    targets = report["targets"]
    ttft = [v / targets["time_to_first_token_seconds"] if v is not None else None
            for v in tl["ttft_p95"]]
    gap = [v / targets["inter_token_latency_seconds"] if v is not None else None
           for v in tl["gap_p95"]]
    ax.plot(minutes, ttft, label="p95 TTFT / target (last minute)")
    ax.plot(minutes, gap, label="p95 mean token gap / ITL target (last minute)")
    ax.axhline(1.0, color="red", linestyle=":", label="target")
    ax.set_ylabel("latency / target")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="baton simulate",
        description="Replay a request trace (CSV time_s,prompt_tokens,output_tokens) through "
                    "the autoscaler and a queueing model of the Model's pools.")
    parser.add_argument("--model", required=True, help="Model YAML file")
    parser.add_argument("--trace", required=True, help="trace CSV")
    parser.add_argument("--profile", help="replica profile JSON (default: the built-in H100 "
                                          "estimate)")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--plot", help="where to write a PNG of load, replicas and latency")
    parser.add_argument("--startup-seconds", type=float, default=MIN_STARTUP_SECONDS,
                        help=f"replica start-up time (>= {MIN_STARTUP_SECONDS:g})")
    args = parser.parse_args(argv)
    try:
        report, run = simulate(args.model, args.trace, args.profile, args.startup_seconds)
    except (OSError, SpecError, ValueError) as e:
        print(f"baton simulate: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, run, args.plot)
    print(f"{report['trace']}: autoscaled TTFT {report['ttft_slo_attainment']:.4f} "
          f"ITL {report['itl_slo_attainment']:.4f} {report['gpu_hours']:.2f} GPU-h "
          f"cost {report['cost']:.2f}; static {report['static']['fleet']} "
          f"{report['static']['gpu_hours']:.2f} GPU-h "
          f"({100 * report['gpu_hours_vs_static']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
