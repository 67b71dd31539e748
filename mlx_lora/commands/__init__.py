"""Commands: the CLI and the Python API behind it (train, eval, generate, chat, serve, convert, fuse,
export, recipes, quickstart)."""
