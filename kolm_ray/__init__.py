"""kolm_ray: compile a frontier-model task into a small, signed, self-hosted LoRA Specialist."""

import logging as _logging


def _not_accelerator_guess(record: _logging.LogRecord) -> bool:
    # DeepSpeed says which accelerator it picked each time it is imported, at WARNING on a
    # machine without a GPU, and accelerate imports it whenever it is installed: every kolm
    # command that loads a model would print it. Nothing else DeepSpeed logs is filtered.
    return not str(record.msg).startswith(("Setting accelerator to CPU", "Setting ds_accelerator to"))


# The logger DeepSpeed creates at import is this one (logging returns the same object by name),
# so the filter holds whoever imports DeepSpeed first.
_logging.getLogger("DeepSpeed").addFilter(_not_accelerator_guess)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kolm_ray")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
