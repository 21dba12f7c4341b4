"""One module per CLI verb, named after it. Each has `add_arguments(parser)` and `run(args) -> int`."""
