"""cmt: consistency mid-training for consistency, mean-flow and flow-map models."""
import os

# OpenMP threads that spin while waiting make torch many times slower on small CPUs shared with
# other processes (measured here: 0.8 s -> 7 s per MNIST step on 2 busy cores). Set before torch is
# imported by any cmt command; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
