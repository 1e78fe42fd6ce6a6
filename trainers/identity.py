"""What a `--resume` must find again, by meaning rather than by spelling.

A run's record (`cmt.trainers.run_files.run_record`, saved in `training-state.pt`) holds its options
and, under "inputs", the identity of what it read (`input_identities`); a resume compares them so:

- `out` is not part of a run (a moved or copied run folder resumes), and an option naming a local file
  or folder (`PATH_OPTIONS`) is compared resolved: `./shards`, `shards` and its absolute path are one,
  and the same command from another directory is the same run.
- The data set and the networks a phase loaded are compared by content, not by path: a data set by
  its `identity()` (trajectories: the build's configuration hash, the count and a fingerprint of the
  shards; images: the count and a fingerprint of names, sizes and labels; latents: as trajectories;
  a built-in set: its name), a network by its sha256 (or built-in name). A moved set may be given by
  its new path; a rebuilt or extended one is refused with what changed, unless the caller says
  `resume_new_data` (`--resume-new-data`).
- A recipe's resolved values define the run, not which of them the recipe filled in: an explicit
  flag equal to the recipe's value resumes (only the recipe's name differing is no difference).
"""
from __future__ import annotations

from pathlib import Path

from cmt.options import differences

# The options that may name a local file or folder.
PATH_OPTIONS = ("data", "teacher", "init", "guide_ckpt", "eval_data")
# What a network's identity is compared by (never its path).
NETWORK_FIELDS = ("kind", "name", "sha256", "preset", "size")


def resolved_path(value):
    """`value` as an absolute path when it names an existing local file or folder, else as it is (a
    built-in name, a URL, a file that is gone)."""
    if isinstance(value, (str, Path)) and "://" not in str(value):
        path = Path(value).expanduser()
        if path.exists():
            return str(path.resolve())
    return str(value) if isinstance(value, Path) else value


def normalised_options(options):
    """`options` (nested dicts) with every `PATH_OPTIONS` value resolved (`resolved_path`) and `out` left out."""
    if not isinstance(options, dict):
        return options
    return {key: resolved_path(value) if key in PATH_OPTIONS else normalised_options(value)
            for key, value in options.items() if key != "out"}


def network_identity(identity):
    """What identifies a network a phase loaded (`cmt.teachers.resolve_teacher`'s identity): its kind,
    built-in name, sha256, preset; a random init: what it copies the architecture of."""
    if not isinstance(identity, dict):
        return identity
    kept = {key: identity[key] for key in NETWORK_FIELDS if identity.get(key) is not None}
    if identity.get("like") is not None:
        kept["like"] = network_identity(identity["like"])
    return kept


def input_identities(data=None, **networks):
    """The "inputs" of a run record: the data set's `identity()` and each named network's identity."""
    inputs = {} if data is None else {"data": data.identity()}
    inputs.update({name: network_identity(identity) for name, identity in networks.items() if identity is not None})
    return inputs


def _without(options, names):
    if not isinstance(options, dict):
        return options
    return {key: _without(value, names) for key, value in options.items() if key not in names}


def _short(key, value):
    """A value of an identity for a message (hashes cut to 12 characters)."""
    if key in ("sha256", "fingerprint", "config_hash") and isinstance(value, str):
        return value[:12] + "..."
    return "(none)" if value is None else value


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """`(option differences, data changes)` between a saved run record and the current one: each
    option's `name: saved X, now Y`, each field of the data's identity `field X -> Y`. Inputs with identities on both sides are compared by content (the data's
    changes apart: `resume_new_data` may accept them); a record saved before identities were
    recorded compares their paths, resolved."""
    saved_inputs, current_inputs = saved.get("inputs") or {}, current.get("inputs") or {}
    # A built-in input (toy:moons, mnist) is its name: compared as the option's value.
    shared = {name for name in set(saved_inputs) & set(current_inputs)
              if "builtin" not in (saved_inputs[name].get("kind"), current_inputs[name].get("kind"))}
    views = [_without(normalised_options(record.get("options", {})), shared) for record in (saved, current)]
    compared = [{key: value for key, value in record.items() if key not in ("options", "inputs")}
                for record in (saved, current)]
    found = differences({**compared[0], "options": views[0]}, {**compared[1], "options": views[1]})
    # Which values a recipe filled in is not part of the run, nor its name when every value agrees.
    recipe = [item for item in found if "recipe" in item[0].split(".")]
    # Resolutions an earlier version recorded and this one no longer makes (ECT's stage_every under a
    # fixed stage, which nothing reads) are no difference either.
    others = [item for item in found if "recipe" not in item[0].split(".")
              and not (item[2] == "(not set)" and item[0].split(".")[-1].startswith("resolved_"))]
    options = [f"{name}: saved {old!r}, now {new!r}" for name, old, new in others]
    if options:
        options += [f"{name}: saved {old!r}, now {new!r}" for name, old, new in recipe
                    if ".values." not in f".{name}."]
    data = []
    for name in sorted(shared):
        old, new = saved_inputs[name], current_inputs[name]
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{key} {_short(key, old.get(key))} -> {_short(key, new.get(key))}"
                       for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        else:
            changed = [f"{old!r} -> {new!r}"]
        if name == "data":
            data.extend(changed)
        else:
            options.append(f"{name}: {'; '.join(changed)} (another file)")
    return options, data
