"""Temporary: the command still lives in cmt.networks.edm2_pickle (being moved here)."""
from cmt.networks.edm2_pickle import convert_main as main  # noqa: F401

if __name__ == "__main__":
    main()
