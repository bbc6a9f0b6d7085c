"""Subcommands of the `molora` command line; each module has add_parser(subparsers) and run(args) -> int."""
