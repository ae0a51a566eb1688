"""Set up in each worker process of the Ray tests' cluster (``worker_process_setup_hook``):
a validator that never returns on files named ``*hang-forever*``, standing in for a parser
stuck in C code, which only killing its process can stop; and one that, given a file named
``*unmount-the-source*``, moves the folder it lies in away (to ``<folder>.unmounted``), as a
share unmounted in the middle of a run."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote, urlparse


def setup() -> None:
    from pipeline.validate import Validator

    real_fit = Validator.fit

    def fit(self, obj, data, extras=None, deadline=None):  # type: ignore[no-untyped-def]
        if "hang-forever" in obj.key:
            while True:
                time.sleep(1)
        if "unmount-the-source" in obj.key:
            root = Path(unquote(urlparse(obj.uri).path)).parent
            root.rename(root.with_name(root.name + ".unmounted"))
        yield from real_fit(self, obj, data, extras, deadline)

    Validator.fit = fit  # type: ignore[method-assign]
