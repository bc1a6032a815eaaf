"""The `scalegen` command line: parses options, calls the library and prints (argparse lives only here)."""
