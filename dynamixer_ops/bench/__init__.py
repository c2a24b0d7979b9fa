from .cli import *  # noqa
from .cli import _finish_args, _fmt, _spread, _x  # noqa
