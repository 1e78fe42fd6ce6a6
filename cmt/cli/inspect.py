"""Temporary: the command still lives in cmt.builders.inspect (being moved here)."""
from cmt.builders.inspect import main  # noqa: F401

if __name__ == "__main__":
    main()
