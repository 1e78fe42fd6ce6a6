"""The WebDataset layout of a shard: `shard-000000.tar.gz`, one sample per trajectory
(`{index:09d}.states.npy`, ...), gzip'ed; trajectory sets only (their `FIELDS`).
"""
import gzip
import io
import json
import tarfile

import numpy as np
import webdataset

from cmt.formats.base import FIELDS, ShardFormat


def encode(arrays, attributes, compression=None, shuffle=None, fields=FIELDS, rows_per_chunk=None):
    """(compression, shuffle and rows_per_chunk are zarr's: WebDataset shards are gzip'ed, always.)"""
    stream = io.BytesIO()
    # Fixed mtime and owner: the same trajectories give byte-identical tars.
    with webdataset.TarWriter(stream, mtime=0, user="cmt", group="cmt") as writer:
        for row, index in enumerate(arrays["index"]):
            writer.write({
                "__key__": f"{int(index):09d}",
                "noise.npy": arrays["noise"][row],
                "states.npy": arrays["states"][row],
                "sigmas.npy": arrays["sigmas"],
                "endpoint.npy": arrays["endpoint"][row],
                "label.cls": int(arrays["label"][row]),
                "json": {"index": int(index), "seed": int(arrays["seed"][row]),
                         "label": int(arrays["label"][row]), **attributes},
            })
    return {"": gzip.compress(stream.getvalue(), compresslevel=1, mtime=0)}


def _decode_all(files):
    samples = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(files[""])), mode="r:") as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    keys = sorted(samples)

    def stack(field):
        return np.stack([np.load(io.BytesIO(samples[key][field])) for key in keys])

    labels = [int(samples[key]["label.cls"]) for key in keys]
    indices = [int(key) for key in keys]
    seeds = [int(json.loads(samples[key]["json"])["seed"]) for key in keys]
    return {
        "index": np.array(indices, dtype=np.int64), "seed": np.array(seeds, dtype=np.uint64),
        "label": np.array(labels, dtype=np.int64), "noise": stack("noise.npy"),
        "states": stack("states.npy"), "sigmas": np.load(io.BytesIO(samples[keys[0]]["sigmas.npy"])),
        "endpoint": stack("endpoint.npy"),
    }


def decode(files, fields=FIELDS, buffers=None):
    arrays = _decode_all(files)
    return {name: arrays[name] for name in fields}


FORMAT = ShardFormat(name="wds", extension=".tar.gz", encode=encode, decode=decode, fields=FIELDS)
