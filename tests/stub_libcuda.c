/* A stand-in for libcuda, for tests without a GPU (tests/test_gpu_paths.py compiles it with gcc).
 *
 * It behaves like the driver where the runtime's correctness depends on it, and records every
 * call (sequence, OS thread id, function, arguments, result) to a log file:
 *   - a context is current per thread (cuCtxSetCurrent); calls that need one fail with
 *     CUDA_ERROR_INVALID_CONTEXT (201) on a thread where it is not current, as the driver does;
 *   - "device" memory is host memory addressed at host address + TAG (bit 44): a pointer
 *     truncated to 32 bits, or a host pointer passed as a device one, is an unknown address and
 *     fails with CUDA_ERROR_INVALID_VALUE (1); new device memory is filled with 0xFF (NaN as
 *     float), so memory used without being zeroed shows;
 *   - pinned host memory (cuMemHostAlloc) is tracked, and copies log whether their host side is;
 *   - stream capture: between cuStreamBeginCapture and cuStreamEndCapture the stream captures;
 *     allocation or synchronisation during a capture invalidates it (as on the driver), and
 *     cuGraphLaunch calls back into the test (stub_set_launch_callback) with the capture's id,
 *     so a fake engine can replay the work it recorded during that capture;
 *   - any call can be made to fail on its n-th use (stub_fail).
 * Only what tests/test_gpu_paths.py needs; signatures are cuda.h's.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

typedef int CUresult;
typedef uint64_t CUdeviceptr;
#define TAG 0x100000000000ULL
#define MAXA 4096

static FILE *logf_;
static long seq_;
static int ctx_refs_;
static char primary_ctx_;               /* the context handle is its address */
static __thread void *current_;         /* per-thread current context */
static int capturing_, capture_invalid_, capture_id_;
static void *capture_stream_;
static void (*launch_cb_)(int);
static char fail_fn_[64];
static int fail_nth_, fail_rc_, fail_seen_;

struct alloc { uintptr_t host; size_t size; int pinned; };
static struct alloc allocs_[MAXA];

static void logline(const char *fn, const char *fmt, unsigned long long a, unsigned long long b,
                    unsigned long long c, unsigned long long d, int rc) {
    if (!logf_) return;
    fprintf(logf_, "%ld %ld %s ", ++seq_, (long)syscall(SYS_gettid), fn);
    fprintf(logf_, fmt, a, b, c, d);
    fprintf(logf_, " rc=%d\n", rc);
    fflush(logf_);
}
#define LOG(fn, fmt, a, b, c, d, rc) logline(fn, fmt, (unsigned long long)(a), (unsigned long long)(b), \
                                             (unsigned long long)(c), (unsigned long long)(d), rc)

static int injected(const char *fn) {
    if (fail_nth_ && strcmp(fn, fail_fn_) == 0 && ++fail_seen_ == fail_nth_) return fail_rc_;
    return 0;
}
static int need_ctx(void) { return (current_ == &primary_ctx_ && ctx_refs_ > 0) ? 0 : 201; }
static struct alloc *find(uintptr_t host, int pinned) {
    for (int i = 0; i < MAXA; i++)
        if (allocs_[i].host && allocs_[i].pinned == pinned && host >= allocs_[i].host &&
            host < allocs_[i].host + allocs_[i].size)
            return &allocs_[i];
    return NULL;
}
static int dev_range(CUdeviceptr p, size_t n, uintptr_t *host) {
    if (p < TAG) return 1;
    struct alloc *a = find((uintptr_t)(p - TAG), 0);
    if (!a || (uintptr_t)(p - TAG) + n > a->host + a->size) return 1;
    *host = (uintptr_t)(p - TAG);
    return 0;
}
static int add(uintptr_t host, size_t size, int pinned) {
    for (int i = 0; i < MAXA; i++)
        if (!allocs_[i].host) { allocs_[i].host = host; allocs_[i].size = size; allocs_[i].pinned = pinned; return 0; }
    return 2;
}
#define GUARD(fn) do { int rc_ = injected(fn); if (rc_) { LOG(fn, "injected", 0, 0, 0, 0, rc_); return rc_; } } while (0)

/* ------------------------------------------------------------ test controls */
void stub_set_log(const char *path) { if (logf_) fclose(logf_); logf_ = path ? fopen(path, "w") : NULL; seq_ = 0; }
void stub_note(const char *what) {
    if (!logf_) return;
    fprintf(logf_, "%ld %ld note %s rc=0\n", ++seq_, (long)syscall(SYS_gettid), what);
    fflush(logf_);
}
void stub_fail(const char *fn, int nth, int rc) { snprintf(fail_fn_, sizeof fail_fn_, "%s", fn); fail_nth_ = nth; fail_rc_ = rc; fail_seen_ = 0; }
void stub_set_launch_callback(void (*cb)(int)) { launch_cb_ = cb; }
int stub_capturing(void) { return capturing_ ? capture_id_ : 0; }
void stub_invalidate_capture(void) { if (capturing_) capture_invalid_ = 1; }
int stub_context_refs(void) { return ctx_refs_; }
int stub_live(int pinned) { int n = 0; for (int i = 0; i < MAXA; i++) n += allocs_[i].host && allocs_[i].pinned == pinned; return n; }
void stub_reset(void) {
    for (int i = 0; i < MAXA; i++) if (allocs_[i].host) { free((void *)allocs_[i].host); allocs_[i].host = 0; }
    ctx_refs_ = 0; capturing_ = capture_invalid_ = 0; fail_nth_ = 0; current_ = NULL;
}

/* ------------------------------------------------------------ device and context */
CUresult cuInit(unsigned flags) { LOG("cuInit", "%llu", flags, 0, 0, 0, 0); return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attr == 75 ? 8 : attr == 76 ? 9 : 0; return 0; }
CUresult cuDeviceGetName(char *name, int len, int dev) { snprintf(name, len, "Stub GPU"); return 0; }
CUresult cuDeviceTotalMem_v2(size_t *bytes, int dev) { *bytes = (size_t)8 << 30; return 0; }
CUresult cuGetErrorString(int rc, const char **s) {
    static char buf[64]; snprintf(buf, sizeof buf, "stub error %d", rc); *s = buf; return 0;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    GUARD("cuDevicePrimaryCtxRetain");
    ctx_refs_++; *ctx = &primary_ctx_;
    LOG("cuDevicePrimaryCtxRetain", "refs=%llu", ctx_refs_, 0, 0, 0, 0); return 0;
}
CUresult cuDevicePrimaryCtxRelease_v2(int dev) {
    int rc = ctx_refs_ > 0 ? 0 : 201;
    if (!rc) ctx_refs_--;
    LOG("cuDevicePrimaryCtxRelease", "refs=%llu", ctx_refs_, 0, 0, 0, rc); return rc;
}
CUresult cuCtxSetCurrent(void *ctx) { current_ = ctx; LOG("cuCtxSetCurrent", "%llx", (uintptr_t)ctx, 0, 0, 0, 0); return 0; }
CUresult cuCtxSynchronize(void) { int rc = need_ctx(); LOG("cuCtxSynchronize", "", 0, 0, 0, 0, rc); return rc; }

/* ------------------------------------------------------------ streams */
CUresult cuStreamCreate(void **s, unsigned flags) {
    int rc = need_ctx();
    if (!rc) *s = malloc(1);
    LOG("cuStreamCreate", "stream=%llx flags=%llu", rc ? 0 : (uintptr_t)*s, flags, 0, 0, rc); return rc;
}
CUresult cuStreamSynchronize(void *s) {
    int rc = need_ctx();
    if (!rc && capturing_ && s == capture_stream_) { capture_invalid_ = 1; rc = 900; }
    GUARD("cuStreamSynchronize");
    LOG("cuStreamSynchronize", "stream=%llx", (uintptr_t)s, 0, 0, 0, rc); return rc;
}
CUresult cuStreamDestroy_v2(void *s) {
    int rc = need_ctx();
    GUARD("cuStreamDestroy_v2");
    if (!rc) free(s);
    LOG("cuStreamDestroy", "stream=%llx", (uintptr_t)s, 0, 0, 0, rc); return rc;
}

/* ------------------------------------------------------------ memory */
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    int rc = need_ctx();
    GUARD("cuMemAlloc_v2");
    if (!rc && capturing_) { capture_invalid_ = 1; rc = 900; }
    if (!rc) {
        void *h = malloc(n);
        memset(h, 0xFF, n);
        rc = add((uintptr_t)h, n, 0);
        *p = (CUdeviceptr)(uintptr_t)h + TAG;
    }
    LOG("cuMemAlloc", "ptr=%llx size=%llu", rc ? 0 : *p, n, 0, 0, rc); return rc;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    int rc = need_ctx();
    GUARD("cuMemFree_v2");
    struct alloc *a = p >= TAG ? find((uintptr_t)(p - TAG), 0) : NULL;
    if (!rc && (!a || a->host != (uintptr_t)(p - TAG))) rc = 1;
    if (!rc) { free((void *)a->host); a->host = 0; }
    LOG("cuMemFree", "ptr=%llx", p, 0, 0, 0, rc); return rc;
}
CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags) {
    int rc = need_ctx();
    GUARD("cuMemHostAlloc");
    if (!rc) { *p = malloc(n); rc = add((uintptr_t)*p, n, 1); }
    LOG("cuMemHostAlloc", "ptr=%llx size=%llu", rc ? 0 : (uintptr_t)*p, n, 0, 0, rc); return rc;
}
CUresult cuMemFreeHost(void *p) {
    int rc = need_ctx();
    struct alloc *a = find((uintptr_t)p, 1);
    if (!rc && (!a || a->host != (uintptr_t)p)) rc = 1;
    if (!rc) { free(p); a->host = 0; }
    LOG("cuMemFreeHost", "ptr=%llx", (uintptr_t)p, 0, 0, 0, rc); return rc;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
    uintptr_t h = 0;
    int rc = need_ctx();
    if (!rc && dev_range(dst, n, &h)) rc = 1;
    if (!rc) memcpy((void *)h, src, n);
    LOG("cuMemcpyHtoDAsync", "dst=%llx size=%llu stream=%llx pinned=%llu", dst, n, (uintptr_t)s,
        find((uintptr_t)src, 1) != NULL, rc);
    return rc;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) {
    uintptr_t h = 0;
    int rc = need_ctx();
    if (!rc && dev_range(src, n, &h)) rc = 1;
    if (!rc) memcpy(dst, (void *)h, n);
    LOG("cuMemcpyDtoHAsync", "src=%llx size=%llu stream=%llx pinned=%llu", src, n, (uintptr_t)s,
        find((uintptr_t)dst, 1) != NULL, rc);
    return rc;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void *s) {
    uintptr_t h = 0;
    int rc = need_ctx();
    if (!rc && dev_range(dst, n, &h)) rc = 1;
    if (!rc) memset((void *)h, v, n);
    LOG("cuMemsetD8Async", "dst=%llx size=%llu stream=%llx", dst, n, (uintptr_t)s, 0, rc); return rc;
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    uintptr_t h = 0;
    int rc = need_ctx();
    if (!rc && dev_range(dst, n, &h)) rc = 1;
    if (!rc) memset((void *)h, v, n);
    LOG("cuMemsetD8", "dst=%llx size=%llu", dst, n, 0, 0, rc); return rc;
}

/* ------------------------------------------------------------ graphs */
CUresult cuStreamBeginCapture_v2(void *s, int mode) {
    int rc = need_ctx();
    GUARD("cuStreamBeginCapture_v2");
    if (!rc) { capturing_ = 1; capture_invalid_ = 0; capture_stream_ = s; capture_id_++; }
    LOG("cuStreamBeginCapture", "stream=%llx mode=%llu id=%llu", (uintptr_t)s, mode, capture_id_, 0, rc); return rc;
}
CUresult cuStreamEndCapture(void *s, void **graph) {
    int rc = need_ctx();
    if (!rc && (!capturing_ || s != capture_stream_)) rc = 1;
    if (!rc) {
        capturing_ = 0;
        if (capture_invalid_) { *graph = NULL; rc = 901; }
        else *graph = (void *)(uintptr_t)(0x6000 + capture_id_);   /* the graph handle carries the id */
    }
    LOG("cuStreamEndCapture", "stream=%llx graph=%llx", (uintptr_t)s, rc ? 0 : (uintptr_t)*graph, 0, 0, rc); return rc;
}
CUresult cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
    int rc = need_ctx();
    GUARD("cuGraphInstantiateWithFlags");
    if (!rc) *exec = (void *)((uintptr_t)graph + 0x1000);
    LOG("cuGraphInstantiate", "graph=%llx exec=%llx", (uintptr_t)graph, rc ? 0 : (uintptr_t)*exec, 0, 0, rc); return rc;
}
CUresult cuGraphLaunch(void *exec, void *s) {
    int rc = need_ctx();
    GUARD("cuGraphLaunch");
    LOG("cuGraphLaunch", "exec=%llx stream=%llx", (uintptr_t)exec, (uintptr_t)s, 0, 0, rc);
    if (!rc && launch_cb_) launch_cb_((int)((uintptr_t)exec - 0x7000));
    return rc;
}
CUresult cuGraphDestroy(void *graph) { LOG("cuGraphDestroy", "graph=%llx", (uintptr_t)graph, 0, 0, 0, 0); return 0; }
CUresult cuGraphExecDestroy(void *exec) {
    int rc = need_ctx();
    LOG("cuGraphExecDestroy", "exec=%llx", (uintptr_t)exec, 0, 0, 0, rc); return rc;
}
