"""The one spelling of a library keyword as a command-line option: `max_steps=4` -> `--max-steps 4`.

Every command's options are named after the keywords of the function it calls, so a call
`function(**kwargs)` has one equivalent command line. The demo's report and the benchmarks write it
so that a user can repeat a step by hand; the tests check that the commands accept it.
"""
import functools
import warnings


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


def renamed_keywords(**old_to_new):
    """Decorator: a function's keyword arguments under their earlier names (`num=` for
    `num_samples=`) keep working, with a DeprecationWarning; the signature (what the commands and
    `help()` read) shows only the new names. Giving both spellings is a TypeError, as for any
    keyword given twice."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__name__}() got both {old}= and its new name {new}=")
                    warnings.warn(f"{function.__name__}({old}=...) is now {new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)
        wrapper.renamed_keywords = dict(old_to_new)
        return wrapper
    return decorate
