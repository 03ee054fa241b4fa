"""`densevse` command line: one module per verb group, each with `register(subparsers)`; `main` in main.py.

Every verb that reads a config takes it as its first positional argument (default ./pipeline.yaml) and
`-s key=value` overrides (args.py)."""
