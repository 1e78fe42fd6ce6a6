"""Temporary: the command still lives in cmt.sampling (being moved here)."""
from cmt.sampling import main  # noqa: F401

if __name__ == "__main__":
    main()
