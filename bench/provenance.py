"""What a benchmark number needs beside it to be reproduced: the command, versions, host, date."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone


def provenance(argv: list[str] | None = None) -> dict:
    from cpm_mobile.exporter.pipeline import library_versions

    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    command = [*program, *(sys.argv[1:] if argv is None else argv)]
    return {
        "command": shlex.join(command),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
                 "cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": library_versions(),
    }
