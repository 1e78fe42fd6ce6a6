"""The command-line tools: each module parses its options, calls the library function of the same
name and turns its `ArgumentError` into a message that names the flag (`cmt.cli.common`).
Only the modules of this package import click."""
