"""The `infalign` subcommands: each module declares its settings dataclass, parses and prints (cli.py loads them)."""
