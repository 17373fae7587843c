# folios.py FILE: kinds of the page-cache pages of FILE, sampled (root: pagemap + kpageflags)
import mmap, os, sys, struct, collections
f = os.path.realpath(sys.argv[1])
fd = os.open(f, os.O_RDONLY)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
n = size // 4096
step = 61
pm = open("/proc/self/pagemap", "rb", buffering=0)
kf = open("/proc/kpageflags", "rb", buffering=0)
start = None
for line in open("/proc/self/maps"):
    p = line.split()
    if len(p) >= 6 and p[5] == f:
        start = int(p[0].split("-")[0], 16)
assert start
hist = collections.Counter()
for i in range(0, n, step):
    _ = m[i*4096]
    pm.seek((start // 4096 + i) * 8)
    e = struct.unpack("<Q", pm.read(8))[0]
    if not (e >> 63) & 1: hist["notpresent"] += 1; continue
    pfn = e & ((1 << 55) - 1)
    kf.seek(pfn * 8)
    fl = struct.unpack("<Q", kf.read(8))[0]
    k = "thp " if (fl >> 22) & 1 else ""
    k += "head" if (fl >> 15) & 1 else "tail" if (fl >> 16) & 1 else "order0"
    hist[k] += 1
print(f, dict(hist))
