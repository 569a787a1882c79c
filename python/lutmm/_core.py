"""The C++ core (extension `lutmm._ext`), with its errors raised as ValueError.

Every extension function returns (error message, result); no C++ exception crosses into Python
(one that did crashed the process on the GPU machine's Python 3.12, 2026-11-25).
"""
from . import _ext


def _wrap(name):
    fn = getattr(_ext, name)

    def call(*args):
        err, value = fn(*args)
        if err:
            raise ValueError(err)
        return value

    call.__name__ = name
    call.__doc__ = fn.__doc__
    return call


for _name in [n for n in dir(_ext) if not n.startswith("_")]:
    globals()[_name] = _wrap(_name)
del _name
