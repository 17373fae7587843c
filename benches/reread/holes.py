import ctypes, mmap, os, sys
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
f = sys.argv[1]
fd = os.open(f, os.O_RDONLY)
size = os.fstat(fd).st_size
addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
n = (size + 4095) // 4096
vec = ctypes.create_string_buffer(n)
assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, ctypes.get_errno()
holes = []; i = 0
while i < n:
    if vec.raw[i] & 1 == 0:
        j = i
        while j < n and vec.raw[j] & 1 == 0: j += 1
        holes.append((i, j - i)); i = j
    else: i += 1
print(len(holes), "holes", sum(h[1] for h in holes), "pages:", " ".join(f"{a*4096:#x}+{l}" for a, l in holes[:40]))
