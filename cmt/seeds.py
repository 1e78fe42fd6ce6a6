"""Seeds derived from other seeds, in one place: the run's seed and a stream, rank, step, trajectory or
sample index give a new seed through numpy's SeedSequence, which mixes every key into every bit.

Three widths, each what its consumer keeps: 63 bits for the training loop's generators (torch's
`manual_seed` takes a non-negative int64), 64 bits for a trajectory's noise (stored with the
shard as uint64), 32 bits for a sample's fresh noise (torch's CPU generator keeps only the low 32 bits
of a seed, so a wider offset such as `seed + 2**40` would repeat the sample's starting noise).
"""
import numpy as np

SEED_BITS = (32, 63, 64)


def derive_seed(*keys, bits=63):
    """A seed of `bits` bits (`SEED_BITS`) that depends on every integer key."""
    state = np.random.SeedSequence([int(key) for key in keys])
    if bits == 32:
        return int(state.generate_state(1)[0])
    if bits not in SEED_BITS:
        raise ValueError(f"bits must be one of {SEED_BITS}, got {bits}")
    return int(state.generate_state(1, dtype=np.uint64)[0] >> (64 - bits))
