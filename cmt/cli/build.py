"""Temporary: the command still lives in cmt.builders.cli (being moved here)."""
from cmt.builders.cli import main  # noqa: F401

if __name__ == "__main__":
    main()
