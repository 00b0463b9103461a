/* block-xenblockctl: the C client of the warm hotplug server (xenblockctl/blockscript/warm.py).
 *
 * libxl execs this for every block device it adds or removes. Starting a Python interpreter and
 * running the hotplug graph cold costs most of an add (bench/README.md, issue 18); a resident
 * server has it imported already and forks a worker that runs today's flow with our argv,
 * environment, stdio, cwd, umask and rlimits. This program only asks and relays the status.
 *
 * The wire (xenblockctl/blockscript/warm.py says the same from the server's side):
 *   1. connect to the SOCK_SEQPACKET socket ($XENBLOCKCTL_HOTPLUG_SOCKET, else SOCKET_PATH);
 *   2. send ONE message "<umask octal>\0<argc>\0<argv...>\0<NAME=value...>\0" with the fds
 *      0, 1, 2 and our cwd (SCM_RIGHTS);
 *   3. wait up to 2 s for one byte: 'A' (the worker acts now) or anything else;
 *   4. after 'A', one byte more: our exit status.
 * Until 'A' nothing has acted, so any failure up to then (no server, refused, timeout, stale
 * code 'S', EOF) closes the socket, which kills a worker that armed meanwhile, and execs the
 * Python script laid beside us (realpath(/proc/self/exe) + ".py"), which runs today's path in
 * its own process. After 'A' we never fall back: the worker may have acted, and a second run
 * would act twice.
 *
 * Plain C99 and POSIX, no library beyond libc: it runs on every VM start. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI: realpath */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef SOCKET_PATH
#define SOCKET_PATH "/run/xenblockctl/hotplug.sock"
#endif
#define SOCKET_ENV "XENBLOCKCTL_HOTPLUG_SOCKET"
#define NAME "block-xenblockctl"
#define MAX_REQUEST (256 * 1024) /* the server's bound (warm.MAX_REQUEST) */
#define FIRST_BYTE_MS 2000       /* a server that accepts but never answers must not stall a VM start */

extern char **environ;

/* Run the laid Python script instead, with our argv[1..] and environment: its shebang carries the
 * interpreter and its flags. Never returns. */
static void fallback(char **argv)
{
    char *self = realpath("/proc/self/exe", NULL);
    if (self == NULL) {
        dprintf(2, "%s: cannot find myself (/proc/self/exe: %s)\n", NAME, strerror(errno));
        _exit(1);
    }
    size_t len = strlen(self);
    char *script = malloc(len + 4);
    if (script == NULL) {
        dprintf(2, "%s: out of memory\n", NAME);
        _exit(1);
    }
    memcpy(script, self, len);
    memcpy(script + len, ".py", 4);
    argv[0] = script;
    execv(script, argv);
    dprintf(2, "%s: cannot run the Python script %s: %s\n", NAME, script, strerror(errno));
    _exit(1);
}

/* Milliseconds left until `deadline` (CLOCK_MONOTONIC), at least 0. */
static int ms_left(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
    return ms < 0 ? 0 : (int)ms;
}

/* The request, in a buffer of its exact size; NULL (and errno) if it would exceed MAX_REQUEST or
 * memory runs out. The umask is read by setting it: the only way POSIX offers, restored at once. */
static char *request(int argc, char **argv, size_t *size)
{
    mode_t mask = umask(077);
    umask(mask);
    char head[32];
    int head_len = snprintf(head, sizeof head, "%o%c%d%c", (unsigned)mask, '\0', argc, '\0');
    size_t total = (size_t)head_len;
    for (int i = 0; i < argc; i++)
        total += strlen(argv[i]) + 1;
    for (char **e = environ; *e != NULL; e++) {
        total += strlen(*e) + 1;
        if (total > MAX_REQUEST)
            break;
    }
    if (total > MAX_REQUEST) {
        errno = EMSGSIZE;
        return NULL;
    }
    char *msg = malloc(total), *at = msg;
    if (msg == NULL)
        return NULL;
    memcpy(at, head, (size_t)head_len);
    at += head_len;
    for (int i = 0; i < argc; i++)
        at = stpcpy(at, argv[i]) + 1;
    for (char **e = environ; *e != NULL; e++)
        at = stpcpy(at, *e) + 1;
    *size = total;
    return msg;
}

/* Send the request with fds 0, 1, 2 and `cwd`; 0, or -1 and errno. MSG_NOSIGNAL: a server that
 * went away must mean a fallback, not our death by SIGPIPE. */
static int send_request(int s, char *msg, size_t size, int cwd)
{
    int fds[4] = {0, 1, 2, cwd};
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = msg, .iov_len = size};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t n;
    do
        n = sendmsg(s, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)size ? 0 : -1;
}

/* One byte from the worker: 1 and *byte, 0 on EOF, -1 on an error; `deadline` NULL: no limit. */
static int recv_byte(int s, unsigned char *byte, const struct timespec *deadline)
{
    for (;;) {
        if (deadline != NULL) {
            struct pollfd p = {.fd = s, .events = POLLIN};
            int ready = poll(&p, 1, ms_left(deadline));
            if (ready < 0 && errno == EINTR)
                continue;
            if (ready <= 0)
                return -1; /* the timeout, or poll failed */
        }
        ssize_t n = recv(s, byte, 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        return n == 1 ? 1 : n == 0 ? 0 : -1;
    }
}

int main(int argc, char **argv)
{
    const char *path = getenv(SOCKET_ENV);
    if (path == NULL || *path == '\0')
        path = SOCKET_PATH;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path)
        fallback(argv); /* no server can listen there */
    strcpy(addr.sun_path, path);

    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        fallback(argv); /* no server (ENOENT, ECONNREFUSED), or not ours to ask (EACCES): nothing sent */

    size_t size = 0;
    char *msg = request(argc, argv, &size);
    if (msg == NULL) {
        if (errno == EMSGSIZE)
            dprintf(2, "%s: arguments and environment exceed %d bytes: not asking the warm server\n", NAME, MAX_REQUEST);
        close(s);
        fallback(argv);
    }
    int cwd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    /* a closed stdio fd fails the send (EBADF): the Python script then runs as it would have */
    if (cwd < 0 || send_request(s, msg, size, cwd) < 0) {
        close(s);
        fallback(argv);
    }
    close(cwd);
    free(msg);

    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += FIRST_BYTE_MS / 1000;
    unsigned char first;
    if (recv_byte(s, &first, &deadline) != 1 || first != 'A') {
        /* timeout, EOF (refused), 'S' (stale code) or garbage: closing kills a worker that armed
         * meanwhile (kill-on-hangup), and nothing acted before an 'A' */
        close(s);
        fallback(argv);
    }
    /* The worker acts now: from here on never fall back. libxl's SIGKILL of this process reaches
     * the worker through the socket's hangup. */
    unsigned char status;
    if (recv_byte(s, &status, NULL) != 1) {
        dprintf(2, "%s: the hotplug worker ended without a status\n", NAME);
        _exit(1);
    }
    _exit(status);
}
