"""Temporary: the command still lives in cmt.evaluation (being moved here)."""
from cmt.evaluation import main  # noqa: F401

if __name__ == "__main__":
    main()
