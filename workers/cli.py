"""The `baton` command.

Each subcommand imports its own dependencies when it runs: the GPU image has no kopf and the
operator image no torch, so importing this module must stay cheap.

    baton up FILE [--host H] [--port P]          a Model spec as local processes
    baton worker prefill|decode --config FILE --pool NAME --grpc-port 50051 --metrics-port 9400
                 --certs DIR | --plaintext
    baton router --config FILE --prefill SERVICE --decode SERVICE --port 8000
                 --certs DIR | --plaintext
    baton operator [--namespace NS]               the operator (python -m baton.operator)
    baton simulate --model FILE --trace TRACE.csv --out OUT.json   autoscaler trace replay
    baton quantize IN_DIR OUT_DIR --format nvfp4|fp8    a ModelOpt-convention checkpoint
    baton perplexity --model DIR FILE...          perplexity on text files (JSON)
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("baton.workers.local", "main", "run a Model spec as local processes"),
    "worker": ("baton.workers.server", "main", "run a prefill or decode worker"),
    "router": ("baton.workers.router", "main", "run the OpenAI-compatible router"),
    "operator": ("baton.operator.__main__", "main", "run the Kubernetes operator"),
    "simulate": ("baton.operator.simulate", "main", "replay a trace through the autoscaler"),
    "quantize": ("baton.workers.quantize", "main", "quantize a checkpoint to NVFP4 or FP8"),
    "perplexity": ("baton.workers.perplexity", "main", "a checkpoint's perplexity on files"),
}


def usage() -> str:
    lines = ["usage: baton <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines.append("\n`baton <command> --help` describes each command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"baton: unknown command {name!r}; expected one of {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
