"""The one spelling of a library keyword as a command-line option: `max_steps=4` -> `--max-steps 4`.

Every command's options are named after the keywords of the function it calls, so a call
`function(**kwargs)` has one equivalent command line. The demo's report and the benchmarks write it
so that a user can repeat a step by hand; the tests check that the commands accept it.
"""


def flag(name):
    """`max_steps` -> `--max-steps`."""
    return "--" + name.replace("_", "-")


def command_words(program, kwargs):
    """`program` (e.g. "cmt-train mid") and its options for `kwargs`: True -> `--name`, False ->
    `--no-name`, a list or tuple -> comma-separated, None -> left out (the default)."""
    words = program.split()
    for name, value in kwargs.items():
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        elif isinstance(value, (list, tuple)):
            words += [flag(name), ",".join(str(item) for item in value)]
        else:
            words += [flag(name), str(value)]
    return words
