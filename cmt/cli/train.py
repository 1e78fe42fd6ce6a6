"""Temporary: the command still lives in cmt.trainers.cli (being moved here)."""
from cmt.trainers.cli import main  # noqa: F401

if __name__ == "__main__":
    main()
