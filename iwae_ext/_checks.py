"""Argument checks shared by the Python layers; messages name the argument."""


def check_choice(name: str, value, choices, where: str = ""):
    """Raise ValueError unless ``value`` is one of ``choices``: "<where>: <name> must be one of ..."."""
    if value not in choices:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be one of {tuple(choices)}, got {value!r}")
