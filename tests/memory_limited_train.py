"""Subprocess helper for tests/test_memory.py: the train command under an address-space limit, so that an allocation
really fails (no mocks).

    python tests/memory_limited_train.py LIMIT_BYTES TRAIN_ARGS...   # LIMIT_BYTES 0: no limit

Prints `vm_peak_bytes N` (VmPeak, the most address space the process held) on stderr at exit, which a run without a
limit uses to place the limit of the next.
"""

from __future__ import annotations

import atexit
import resource
import sys
from pathlib import Path


def report_vm_peak() -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            print(f"vm_peak_bytes {int(line.split()[1]) * 1024}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    limit = int(sys.argv[1])
    atexit.register(report_vm_peak)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from caption_train.cli import main

    sys.exit(main(["train", *sys.argv[2:]]))
