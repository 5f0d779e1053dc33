/* Exact peak of live heap bytes, for benchmarks/unroll_memory.py (loaded with LD_PRELOAD).

   glibc lets a preloaded library replace malloc and friends; these wrappers call glibc's own
   __libc_* functions and keep two counters of live bytes (malloc_usable_size of each block):
   every allocation, and the aligned ones alone (posix_memalign / aligned_alloc / memalign:
   PyTorch's CPU allocator gets every tensor's storage from posix_memalign, nothing else in the
   process asks for them in bulk, so that counter is the CPU's torch-allocated tensor bytes, the
   analogue of torch.cuda.memory_allocated). Each counter keeps its peak since the last
   alloc_counter_reset(). Aligned blocks are remembered in a small open-addressing table so that
   free() knows which counter a block belongs to. A spin lock makes the counts exact under
   threads. Build: gcc -O2 -shared -fPIC -o alloc_counter.so alloc_counter.c */

#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

#define SLOTS (1u << 16) /* live aligned blocks at once; 512 KiB of table */

static uintptr_t table[SLOTS];
static long long live_all, peak_all, live_aligned, peak_aligned, lost;
static char lock;

static void acquire(void) { while (__atomic_test_and_set(&lock, __ATOMIC_ACQUIRE)) { } }
static void release(void) { __atomic_clear(&lock, __ATOMIC_RELEASE); }

static size_t slot_of(uintptr_t p) { return (size_t)((p >> 4) * 0x9E3779B97F4A7C15ull >> 48) & (SLOTS - 1); }

static void count(long long bytes, int aligned) {
    live_all += bytes;
    if (live_all > peak_all) peak_all = live_all;
    if (aligned) {
        live_aligned += bytes;
        if (live_aligned > peak_aligned) peak_aligned = live_aligned;
    }
}

static void remember(void *p) { /* under the lock */
    size_t i = slot_of((uintptr_t)p);
    for (size_t n = 0; n < SLOTS; n++, i = (i + 1) & (SLOTS - 1)) {
        if (table[i] == 0) { table[i] = (uintptr_t)p; return; }
    }
    lost++; /* table full: counted in "all" only when freed */
}

static int forget(void *p) { /* under the lock; 1 if p was an aligned block */
    size_t i = slot_of((uintptr_t)p);
    while (table[i] != 0) {
        if (table[i] == (uintptr_t)p) {
            /* backward-shift deletion keeps every probe chain unbroken */
            size_t hole = i, j = i;
            for (;;) {
                j = (j + 1) & (SLOTS - 1);
                if (table[j] == 0) break;
                size_t home = slot_of(table[j]);
                /* the entry at j may fill the hole unless its home lies cyclically in (hole, j] */
                int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
                if (!stays) {
                    table[hole] = table[j];
                    hole = j;
                }
            }
            table[hole] = 0;
            return 1;
        }
        i = (i + 1) & (SLOTS - 1);
    }
    return 0;
}

void *malloc(size_t size) {
    void *p = __libc_malloc(size);
    if (p) { acquire(); count((long long)malloc_usable_size(p), 0); release(); }
    return p;
}

void *calloc(size_t n, size_t size) {
    void *p = __libc_calloc(n, size);
    if (p) { acquire(); count((long long)malloc_usable_size(p), 0); release(); }
    return p;
}

void free(void *p) {
    if (!p) return;
    long long bytes = (long long)malloc_usable_size(p);
    acquire();
    int aligned = forget(p);
    count(-bytes, aligned);
    release();
    __libc_free(p);
}

void *realloc(void *p, size_t size) {
    if (!p) return malloc(size);
    long long before = (long long)malloc_usable_size(p);
    acquire();
    int aligned = forget(p);
    release();
    void *q = __libc_realloc(p, size);
    acquire();
    if (q) {
        count(-before, aligned);
        count((long long)malloc_usable_size(q), 0);
    } else if (aligned) {
        remember(p); /* realloc failed: p is still the aligned block it was */
    }
    release();
    return q;
}

static void *aligned(size_t alignment, size_t size) {
    void *p = __libc_memalign(alignment, size);
    if (p) { acquire(); remember(p); count((long long)malloc_usable_size(p), 1); release(); }
    return p;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *p = aligned(alignment, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

void *aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }
void *memalign(size_t alignment, size_t size) { return aligned(alignment, size); }
void *valloc(size_t size) { return aligned(4096, size); }
void *pvalloc(size_t size) { return aligned(4096, (size + 4095) & ~(size_t)4095); }

/* The Python side (ctypes) */
void alloc_counter_reset(void) { acquire(); peak_all = live_all; peak_aligned = live_aligned; release(); }
long long alloc_counter_live(int aligned_only) { return aligned_only ? live_aligned : live_all; }
long long alloc_counter_peak(int aligned_only) { return aligned_only ? peak_aligned : peak_all; }
long long alloc_counter_lost(void) { return lost; }
