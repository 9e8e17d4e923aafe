"""The online SELM loop, its run config, and the CLI subcommands built on them."""
