"""baton.workers: model runtime, engine, prefill/decode servers, router and the `baton` CLI.

Importing this package imports nothing heavy: each subcommand loads its own dependencies.
"""
