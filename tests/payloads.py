"""Pickles that run code when unpickled: what a malicious weights file holds."""

import builtins
import os


class Exploit:
    """Unpickles as func(arg): what a malicious pickle does."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


EXPLOITS = [(os.system, "touch {marker}"), (builtins.exec, "open({marker!r}, 'w').close()")]


def leaves_a_marker(marker):
    """A payload that creates the file `marker` when unpickled (os.system's touch)."""
    return Exploit(os.system, f"touch {marker}")
