# punch.py FILE N: drop N scattered single pages of FILE from the page cache (POSIX_FADV_DONTNEED)
import os, sys
f, n = sys.argv[1], int(sys.argv[2])
fd = os.open(f, os.O_RDONLY)
size = os.fstat(fd).st_size
pages = size // 4096
step = pages // n
for i in range(n):
    os.posix_fadvise(fd, (i * step + 7) * 4096, 4096, os.POSIX_FADV_DONTNEED)
