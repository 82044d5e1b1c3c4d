"""`baton simulate`: replay a request trace through the autoscaling policy and a queueing
model of the pools, and compare with the smallest static fleet that meets the same targets
and with the oracle, a fleet that follows the load exactly.

    baton simulate --model examples/traces/model.yaml --trace examples/traces/surges.csv \\
        --out surges.json --plot surges.png [--profile profile.json] [--startup-seconds 90]

The JSON holds, for the autoscaled run: ttft_slo_attainment and itl_slo_attainment (shares
of all requests within the Model's targets), worst_window_ttft_attainment and
worst_window_itl_attainment (the lowest share among the requests arriving in any 5-minute
window: baton.operator.autoscaler.windows), gpu_hours and cost (from costPerHour); "static"
with the same keys (plus the fleet) for the smallest fixed fleet meeting both whole-trace
attainment targets in the same simulator; "oracle" with the GPU hours and cost of a fleet
that follows the load exactly with the same start-up time and scale-down window (a lower
bound: baton.operator.autoscaler.oracle); gpu_hours_vs_static and gpu_hours_vs_oracle. The
plot shows load, replicas per role and pool (static and oracle fleets drawn over them),
p95 latency over the last minute, and attainment over the last 5 minutes with the worst
window marked. The model of the pools is described in baton.operator.autoscaler.simulator.
Replica start-up defaults to the Model's autoscaling.startupSeconds (at least 90 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from baton.operator.autoscaler.oracle import OracleFleet
from baton.operator.autoscaler.policy import ROLES
from baton.operator.autoscaler.profile import load_profile
from baton.operator.autoscaler.simulator import MIN_STARTUP_SECONDS, RunResult, Simulator, Trace
from baton.operator.autoscaler.windows import WINDOW_SECONDS
from baton.operator.spec import SpecError, load_model_file

__all__ = ["main", "simulate", "plot", "Simulation"]


@dataclass
class Simulation:
    """What `baton simulate` computed: the report (the JSON) and the runs it drew from."""

    report: dict
    run: RunResult
    static: RunResult
    oracle: OracleFleet


def simulate(model_path: str | Path, trace_path: str | Path,
             profile_path: str | Path | None = None,
             startup_seconds: float | None = None) -> Simulation:
    """Runs the autoscaled replay, the static search and the oracle. startup_seconds: None
    takes the Model's autoscaling.startupSeconds (at least MIN_STARTUP_SECONDS)."""
    model, _ = load_model_file(model_path)
    profile = load_profile(profile_path)
    trace = Trace.load_csv(trace_path)
    if startup_seconds is None:
        startup_seconds = max(MIN_STARTUP_SECONDS,
                              float(model.spec.autoscaling.startup_seconds))
    sim = Simulator(model.spec, profile, trace, startup_seconds=startup_seconds)
    started = time.perf_counter()
    initial = sim.initial_fleet()
    run = sim.run(initial, autoscale=True)
    fleet, static, static_ok = sim.search_static()
    oracle = sim.oracle()
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
        "scale_down_stabilization_seconds":
            model.spec.autoscaling.scale_down_stabilization_seconds,
        **run.summary(),
        "worst_window_seconds": WINDOW_SECONDS,
        "meets_targets": bool(run.ttft_slo_attainment >= targets.attainment
                              and run.itl_slo_attainment >= targets.attainment),
        "gpu_hours_vs_static": round(run.gpu_hours / static.gpu_hours, 4),
        "gpu_hours_vs_oracle": round(run.gpu_hours / oracle.gpu_hours, 4),
        "decisions": run.decisions,
        "scale_events": run.scale_events,
        "initial_fleet": initial,
        "peak_fleet": peak,
        "static": {**static.summary(), "fleet": fleet, "meets_targets": static_ok},
        "oracle": oracle.summary(),
        "timeline": {
            "time_s": run.timeline["time"],
            "request_rate": [round(v, 3) for v in run.timeline["request_rate"]],
            "replicas": run.timeline["replicas"],
            "reason": run.timeline["reason"],
        },
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    return Simulation(report, run, static, oracle)


def plot(result: Simulation, path: str | Path) -> None:
    """Load; replicas per role and pool with the static (dashed) and oracle (dotted) fleets;
    p95 latency over the last minute against the targets; attainment over the last
    5 minutes with the worst window marked, the static fleet's beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    report, run = result.report, result.run
    tl = run.timeline
    minutes = [t / 60 for t in tl["time"]]
    # the fleet from t = 0 until the first decision
    fleet_minutes = [0.0] + minutes
    fleets = [report["initial_fleet"]] + tl["replicas"]
    fig, axes = plt.subplots(5, 1, figsize=(11, 15), sharex=True)
    ax = axes[0]
    ax.plot(minutes, tl["request_rate"], color="black", label="requests/s")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.plot(minutes, [v / 1000 for v in tl["prompt_tokens_per_second"]], color="tab:gray",
             alpha=0.6, label="prompt ktokens/s")
    ax2.set_ylabel("prompt ktokens/s")
    ax.set_title(
        f"{report['model']} on {report['trace']}: autoscaled {report['gpu_hours']:.1f} GPU-h, "
        f"static {report['static']['gpu_hours']:.1f} "
        f"({100 * report['gpu_hours_vs_static']:.0f}%), oracle "
        f"{report['oracle']['gpu_hours']:.1f} ({100 * report['gpu_hours_vs_oracle']:.0f}%)\n"
        f"attainment TTFT {report['ttft_slo_attainment']:.3f} (worst 5 min "
        f"{report['worst_window_ttft_attainment']:.3f}), ITL "
        f"{report['itl_slo_attainment']:.3f} (worst 5 min "
        f"{report['worst_window_itl_attainment']:.3f})", fontsize=10)
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    oracle_minutes = np.arange(len(result.oracle.total("prefill"))) / 60
    for ax, role in zip(axes[1:3], ROLES):
        pools = list(report["static"]["fleet"][role])
        series = [[r[role][p] for r in fleets] for p in pools]
        ax.stackplot(fleet_minutes, *series, labels=[f"{role} {p}" for p in pools], step="post",
                     alpha=0.8)
        ax.axhline(sum(report["static"]["fleet"][role].values()), color="black",
                   linestyle="--", label=f"static fleet ({report['static']['fleet'][role]})")
        ax.plot(oracle_minutes, result.oracle.total(role), color="black", linestyle=":",
                linewidth=1.2, label="oracle fleet (follows the load exactly)")
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
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[4]
    for key, label, color in (("ttft", "TTFT", "tab:blue"), ("itl", "ITL", "tab:orange")):
        ends, share = run.windows[key]
        ax.plot(ends / 60, share, color=color, label=f"{label} attainment, last 5 min")
        static_ends, static_share = result.static.windows[key]
        ax.plot(static_ends / 60, static_share, color=color, linestyle=":", alpha=0.7,
                label=f"{label}, static fleet")
        if np.any(~np.isnan(share)):
            i = int(np.nanargmin(share))
            ax.plot([ends[i] / 60], [share[i]], marker="v", color=color, markersize=9)
            ax.annotate(f"worst {label} {share[i]:.3f}", (ends[i] / 60, share[i]),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color=color)
    ax.axhline(targets["attainment"], color="red", linestyle=":",
               label=f"attainment target {targets['attainment']:g}")
    ax.axhline(0.9, color="gray", linestyle="--", linewidth=0.8, label="0.90")
    ax.set_ylabel("share within target")
    ax.set_xlabel("minutes")
    low = min([0.85] + [float(np.nanmin(w[1])) for r in (run, result.static)
                        for w in r.windows.values() if np.any(~np.isnan(w[1]))])
    ax.set_ylim(max(0.0, low - 0.02), 1.005)
    ax.legend(loc="lower left", fontsize=8, ncol=3)
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
    parser.add_argument("--startup-seconds", type=float, default=None,
                        help=f"replica start-up time (>= {MIN_STARTUP_SECONDS:g}; default: "
                             "the Model's autoscaling.startupSeconds, at least that)")
    args = parser.parse_args(argv)
    try:
        result = simulate(args.model, args.trace, args.profile, args.startup_seconds)
    except (OSError, SpecError, ValueError) as e:
        print(f"baton simulate: {e}", file=sys.stderr)
        return 2
    report = result.report
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(f"{report['trace']}: autoscaled TTFT {report['ttft_slo_attainment']:.4f} "
          f"(worst 5 min {report['worst_window_ttft_attainment']:.4f}) "
          f"ITL {report['itl_slo_attainment']:.4f} "
          f"(worst 5 min {report['worst_window_itl_attainment']:.4f}) "
          f"{report['gpu_hours']:.2f} GPU-h cost {report['cost']:.2f}; static "
          f"{report['static']['fleet']} {report['static']['gpu_hours']:.2f} GPU-h "
          f"({100 * report['gpu_hours_vs_static']:.1f}%); oracle "
          f"{report['oracle']['gpu_hours']:.2f} GPU-h "
          f"({100 * report['gpu_hours_vs_oracle']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
