import os
import sys

# Before torch is imported (c10 reads it once): CPU tensors of 2 MB and more are allocated 2 MB-aligned and
# madvise'd as transparent huge pages. The merge makes a few 100 MB tensors per weight; on 4 KB pages each one
# is hundreds of thousands of page faults (the 7B-shaped benchmark: 8.2 M faults, 27 s of system time on
# 2 cores). Set THP_MEM_ALLOC_ENABLE=0 to opt out; a kernel with THP "never" ignores it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from qmerge.cli import main  # noqa: E402 - after the allocator setting above

sys.exit(main())
