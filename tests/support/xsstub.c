/*
 * LD_PRELOAD stub that lets Debian 12's C xenstored (Xen 4.17) run without a hypervisor.
 *
 * The conformance lane uses the real daemon as the oracle for our client and for the embedded
 * xenstored. xenstored insists on talking to Xen at start-up (domain_init, dom0_init); these
 * definitions satisfy exactly the imports of the 4.17 binary (`nm -D --undefined-only`) so its
 * normal start-up path runs and builds the store. Unversioned symbols bind to the binary's
 * versioned references (VERS_1.0, VERS_4.17.0).
 *
 * Version coupling: 4.20 calls xc_domain_getinfo_single and 4.21 uses xenmanage_*; a newer Xen
 * needs a new stub. See /work/shared/reference/xenstore-for-tests.md section 3.3.
 *
 * Compiled by tests/fixtures/cxenstored.py into a cache directory; never committed as a binary.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Opaque handles: the daemon only passes them back to us, so any distinct non-NULL address works. */
static int xc_handle_dummy, gnttab_handle_dummy, evtchn_handle_dummy;

/* ---- libxenctrl ---------------------------------------------------------------------------- */

void *xc_interface_open(void *logger, void *dombuild_logger, unsigned flags)
{
    (void)logger; (void)dombuild_logger; (void)flags;
    return &xc_handle_dummy;
}

int xc_interface_close(void *xch)
{
    (void)xch;
    return 0;
}

/*
 * Every guest domid "exists and runs": xenstored drops SET_PERMS entries naming unknown domains
 * and refuses INTRODUCE for them. Only the leading fields of xc_dominfo_t are filled:
 * u32 domid, u32 ssidref, then the flag bitfield (dying:1 crashed:1 shutdown:1 paused:1
 * blocked:1 running:1 ...), of which only `running` (bit 5) is set.
 */
#define DOMID_FIRST_RESERVED 0x7FF0U
int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms, void *info)
{
    (void)xch;
    if (first_domid >= DOMID_FIRST_RESERVED || max_doms < 1)
        return 0;
    uint32_t *words = info;
    words[0] = first_domid;
    words[1] = 0;
    words[2] = 1U << 5;
    return 1;
}

/* ---- libxengnttab -------------------------------------------------------------------------- */

void *xengnttab_open(void *logger, unsigned flags)
{
    (void)logger; (void)flags;
    return &gnttab_handle_dummy;
}

int xengnttab_close(void *xgt)
{
    (void)xgt;
    return 0;
}

int xengnttab_set_max_grants(void *xgt, uint32_t nr_grants)
{
    (void)xgt; (void)nr_grants;
    return 0;
}

/*
 * Acting as a guest (opt-in): with $XSSTUB_RING_DIR set, a fake guest's ring page is the shared
 * file $XSSTUB_RING_DIR/ring-<domid>, so a test mapping the same file speaks to the daemon as
 * that domain, unprivileged, through the real ring code (tests/support/xsring.py). The daemon
 * only polls its event-channel fd, so that becomes the FIFO $XSSTUB_RING_DIR/evtchn: one byte
 * written there wakes it to look at the rings. Without the variable: private zeroed memory,
 * a ring that is always empty.
 */
static const char *ring_dir(void)
{
    const char *dir = getenv("XSSTUB_RING_DIR");
    return dir && *dir ? dir : NULL;
}

void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref, int prot)
{
    (void)xgt; (void)ref; (void)prot;
    const char *dir = ring_dir();
    if (dir) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/ring-%u", dir, (unsigned)domid);
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0)
            return NULL;
        void *shared = MAP_FAILED;
        if (ftruncate(fd, 4096) == 0)
            shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        return shared == MAP_FAILED ? NULL : shared;
    }
    void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

int xengnttab_unmap(void *xgt, void *start_address, uint32_t count)
{
    (void)xgt;
    return munmap(start_address, 4096UL * count);
}

/* ---- libxenevtchn -------------------------------------------------------------------------- */

/* The daemon polls this fd for VIRQ_DOM_EXC. Nobody ever writes the pipe, so check_domains()
 * never runs and fake domains never "die". */
static int evtchn_pipe[2] = {-1, -1};
static int next_port = 10;

static void *evtchn_handle(void)
{
    const char *dir = ring_dir();
    if (evtchn_pipe[0] >= 0)
        return &evtchn_handle_dummy;
    if (dir) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/evtchn", dir);
        if (mkfifo(path, 0600) != 0 && errno != EEXIST)
            return NULL;
        /* O_RDWR: never blocks on open, never reports EOF when a test's writer closes. */
        evtchn_pipe[0] = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        return evtchn_pipe[0] < 0 ? NULL : &evtchn_handle_dummy;
    }
    if (pipe2(evtchn_pipe, O_CLOEXEC) != 0)
        return NULL;
    return &evtchn_handle_dummy;
}

void *xenevtchn_open(void *logger, unsigned flags)
{
    (void)logger; (void)flags;
    return evtchn_handle();
}

void *xenevtchn_fdopen(void *logger, int fd, unsigned flags)
{
    (void)logger; (void)fd; (void)flags;
    return evtchn_handle();
}

int xenevtchn_close(void *xce)
{
    (void)xce;
    return 0;
}

int xenevtchn_fd(void *xce)
{
    (void)xce;
    return evtchn_pipe[0];
}

int xenevtchn_bind_virq(void *xce, unsigned int virq)
{
    (void)xce; (void)virq;
    return next_port++;
}

int xenevtchn_bind_interdomain(void *xce, uint32_t domid, uint32_t remote_port)
{
    (void)xce; (void)domid; (void)remote_port;
    return next_port++;
}

int xenevtchn_unbind(void *xce, uint32_t port)
{
    (void)xce; (void)port;
    return 0;
}

int xenevtchn_notify(void *xce, uint32_t port)
{
    (void)xce; (void)port;
    return 0;
}

int xenevtchn_unmask(void *xce, uint32_t port)
{
    (void)xce; (void)port;
    return 0;
}

int xenevtchn_pending(void *xce)
{
    (void)xce;
    char wakeups[64];
    ssize_t got = 0;
    /* Called only when poll() found the fd readable: swallow every pending wake-up byte and
     * name a port that is not VIRQ_DOM_EXC's (0 is never bound), so no domain is "checked". */
    while (evtchn_pipe[0] >= 0 && read(evtchn_pipe[0], wakeups, sizeof(wakeups)) > 0)
        got = 1;
    if (!got) {
        errno = EAGAIN;
        return -1;
    }
    return 0;
}

/* ---- libc open(): the two /proc/xen files dom0_init reads -------------------------------- */

static int memfd_with(const char *name, const void *data, size_t len, size_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)size) != 0 || (len && pwrite(fd, data, len, 0) != (ssize_t)len)) {
        close(fd);
        return -1;
    }
    return fd;
}

int open(const char *path, int flags, ...)
{
    static int (*real_open)(const char *, int, ...);
    mode_t mode = 0;

    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t)va_arg(ap, int);
        va_end(ap);
    }
    /* Event channel of dom0's (never used) ring: any port number will do. */
    if (strcmp(path, "/proc/xen/xsd_port") == 0)
        return memfd_with("xsd_port", "1\n", 2, 2);
    /* dom0's ring page, which nobody writes: its indexes stay 0, so it never has a request. */
    if (strcmp(path, "/proc/xen/xsd_kva") == 0)
        return memfd_with("xsd_kva", NULL, 0, 4096);
    if (!real_open)
        real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    if (!real_open) {
        errno = ENOSYS;
        return -1;
    }
    return real_open(path, flags, mode);
}
