"""How an ``mtnlg`` process ends: as the interpreter would, less its final teardown.

With torch loaded, the interpreter's teardown (torch's C++ static objects, gloo's thread
pools, every module's objects collected one by one) holds a CPU for 1-2 s after the work
is done: in each training process, in ``torchrun``'s children and in the ``mtnlg`` command
itself, at every launch. :func:`exit_process` does what the interpreter does at exit that
anyone can observe (other non-daemon threads joined, ``atexit`` handlers run, logging and
the standard streams flushed) and then ends the process. ``MTNLG_FULL_EXIT=1`` keeps the
interpreter's own exit (for tools that hook its teardown). ``benchmarks/launch.py``
measures the difference.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int | None) -> NoReturn:
    """End this process with exit status ``code`` (None: 0), as described above."""
    code = 0 if code is None else int(code)
    if os.environ.get("MTNLG_FULL_EXIT", "") not in ("", "0"):
        sys.exit(code)
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # logging.shutdown() among them; the interpreter's own order
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
