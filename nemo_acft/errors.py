"""How the command-line entry points fail: one line, ``error: <what, where, what was
expected>``, on standard error, and an exit code that says what kind of failure it was.

- exit 2: bad input (:class:`InputError`, and every ``ValueError``: the checks of configs,
  files and artifacts raise them naming the key, file or value), a damaged artifact, or a run
  directory in use (:class:`Refused`);
- exit 1: anything else (a failed world, a full disk, a bug), still one line;
- exit 143: stopped on SIGTERM/SIGUSR1 after a checkpoint (rerun to resume).

``ACFT_DEBUG=1`` prints the traceback as well. A leaf module: every layer may import it.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable

#: exit code of bad input, a damaged artifact or a refused lock
EXIT_INPUT = 2
#: exit code of a process that stopped on SIGTERM/SIGUSR1 after checkpointing
EXIT_STOPPED = 143


class InputError(ValueError):
    """Bad input from the user: a config value, a file, a model, an oracle. The message names
    it and says what was expected."""


class Refused(RuntimeError):
    """The run directory is in use by another process, or a role was started out of order."""


def debug() -> bool:
    """``ACFT_DEBUG=1``: tracebacks on the console."""
    return os.environ.get("ACFT_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a ``KeyError``'s without its quotes; an exception
    without a message by its type)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        msg = e.args[0]
    else:
        msg = str(e)
    msg = " ".join(msg.split())
    if not msg:
        return type(e).__name__
    if isinstance(e, INPUT_ERRORS) or type(e).__module__.startswith("nemo_acft"):
        return msg
    return f"{type(e).__name__}: {msg}"


#: exceptions that mean bad input (or a refused lock): exit 2
INPUT_ERRORS = (ValueError, Refused, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def exit_code(e: BaseException) -> int:
    """2 for bad input, a damaged artifact or a refused lock, 1 otherwise (an exception may
    carry its own ``exit_code``, e.g. a failed world reporting its rank's)."""
    code = getattr(e, "exit_code", None)
    if isinstance(code, int):
        return code
    return EXIT_INPUT if isinstance(e, INPUT_ERRORS) else 1


def entry_point(main: Callable) -> Callable:
    """Wrap a command's ``main``: an exception becomes ``error: <one line>`` on stderr and its
    exit code (:func:`exit_code`); the traceback only with ``ACFT_DEBUG=1``."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        from nemo_acft import quiet

        quiet.apply()
        try:
            return main(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the one place every failure is reported
            if debug():
                traceback.print_exc()
            hint = "" if debug() or exit_code(e) == EXIT_INPUT else \
                " (ACFT_DEBUG=1 shows the traceback)"
            print(f"error: {one_line(e)}{hint}", file=sys.stderr, flush=True)
            raise SystemExit(exit_code(e)) from None
    return wrapped


__all__ = ["InputError", "Refused", "EXIT_INPUT", "EXIT_STOPPED", "debug", "one_line",
           "exit_code", "entry_point"]
