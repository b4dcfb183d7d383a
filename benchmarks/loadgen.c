/*
 * Backend server and load generator for the docker-router benchmarks.
 *
 * Written in C so that both ends of every measurement are far cheaper than
 * the relay being measured: the harness checks that a direct connection is
 * several times faster than the router, otherwise it would be measuring
 * itself.  Compiled at run time by benchmarks/ (gcc -O2); not installed.
 *
 * Protocol (byte-transparent relays do not care): every request is 16 bytes,
 * one opcode letter followed by 15 decimal digits.
 *   G<n>  the server answers with n bytes of payload           (download)
 *   P<n>  the client then sends n bytes; server answers K<n>   (upload)
 *   Q<0>  the server answers R000000000000000                  (tiny request)
 * Connections are keep-alive; the server closes when the client does.
 *
 * Usage:
 *   loadgen server SOCK
 *   loadgen down SOCK BYTES
 *   loadgen up SOCK BYTES
 *   loadgen latency SOCK COUNT
 *   loadgen connrate SOCK COUNT WORKERS
 *   loadgen hold SOCK COUNT          (prints a READY line, holds until stdin EOF)
 *   loadgen slow SOCK BYTES RATE SECONDS
 *   loadgen stall SOCK COUNT         (endless downloads never read; READY, then holds)
 * Clients print one line of key=value results on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 16
#define BIG (1 << 20)

static char bigbuf[BIG];

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t nowNs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* This process's own CPU (user+sys), so the harness can tell how busy the
 * load generator was. */
static unsigned long long selfCpuNs(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (unsigned long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ull +
           (unsigned long long)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ull;
}

static void raiseNofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void fillAddr(struct sockaddr_un *sa, const char *path) {
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path)) {
        fprintf(stderr, "socket path too long: %s\n", path);
        exit(2);
    }
    strcpy(sa->sun_path, path);
}

static void makeHdr(char *out, char op, long long n) {
    char tmp[HDR + 1];
    snprintf(tmp, sizeof(tmp), "%c%015lld", op, n);
    memcpy(out, tmp, HDR);
}

static long long parseHdr(const char *h) {
    long long n = 0;
    for (int i = 1; i < HDR; i++) {
        if (h[i] < '0' || h[i] > '9') return -1;
        n = n * 10 + (h[i] - '0');
    }
    return n;
}

static void setNonblock(int fd, int on) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

/* ------------------------------------------------------------------ server */

enum { S_HDR, S_SEND, S_RECV, S_REPLY };

struct conn {
    int state;
    int hlen;
    long long remain;
    long long total;
    char hdr[HDR];
    char reply[HDR];
    int roff;
};

static struct conn **conns;
static int epfd;

static void serverClose(int fd) {
    free(conns[fd]);
    conns[fd] = NULL;
    close(fd);
}

static void want(int fd, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.fd = fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &e);
}

static void queueReply(int fd, struct conn *c, char op, long long n) {
    makeHdr(c->reply, op, n);
    c->roff = 0;
    c->state = S_REPLY;
}

/* Returns 0 to keep the connection, -1 to close it. */
static int serverStep(int fd, struct conn *c) {
    for (int rounds = 0; rounds < 64; rounds++) {
        if (c->state == S_HDR) {
            ssize_t r = read(fd, c->hdr + c->hlen, HDR - c->hlen);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            c->hlen += r;
            if (c->hlen < HDR) continue;
            c->hlen = 0;
            long long n = parseHdr(c->hdr);
            if (n < 0) return -1;
            if (c->hdr[0] == 'G') {
                c->state = S_SEND;
                c->remain = n;
            } else if (c->hdr[0] == 'P') {
                c->state = S_RECV;
                c->remain = n;
                c->total = n;
                if (n == 0) queueReply(fd, c, 'K', 0);
            } else if (c->hdr[0] == 'Q') {
                queueReply(fd, c, 'R', 0);
            } else {
                return -1;
            }
        } else if (c->state == S_SEND) {
            size_t want_ = c->remain > BIG ? BIG : (size_t)c->remain;
            ssize_t w = send(fd, bigbuf, want_, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN) {
                    want(fd, EPOLLOUT);
                    return 0;
                }
                return errno == EINTR ? 0 : -1;
            }
            c->remain -= w;
            if (c->remain == 0) {
                c->state = S_HDR;
                want(fd, EPOLLIN);
            }
        } else if (c->state == S_RECV) {
            size_t want_ = c->remain > BIG ? BIG : (size_t)c->remain;
            ssize_t r = read(fd, bigbuf, want_);
            if (r == 0) return -1;
            if (r < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
            c->remain -= r;
            if (c->remain == 0) queueReply(fd, c, 'K', c->total);
        } else { /* S_REPLY */
            ssize_t w = send(fd, c->reply + c->roff, HDR - c->roff, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN) {
                    want(fd, EPOLLOUT);
                    return 0;
                }
                return errno == EINTR ? 0 : -1;
            }
            c->roff += w;
            if (c->roff == HDR) {
                c->state = S_HDR;
                want(fd, EPOLLIN);
                return 0; /* level-triggered: epoll tells us about the next request */
            }
        }
    }
    return 0;
}

static int runServer(const char *path) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    conns = calloc(rl.rlim_cur + 1, sizeof(*conns));
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    struct sockaddr_un sa;
    fillAddr(&sa, path);
    unlink(path);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0) die("bind");
    chmod(path, 0666);
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &e);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(epfd, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (int k = 0; k < 256; k++) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    if ((rlim_t)cfd >= rl.rlim_cur) {
                        close(cfd);
                        continue;
                    }
                    conns[cfd] = calloc(1, sizeof(struct conn));
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ce);
                }
                continue;
            }
            struct conn *c = conns[fd];
            if (c == NULL) continue;
            if (serverStep(fd, c) < 0) serverClose(fd);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ clients */

static int connectBlocking(const char *path) {
    struct sockaddr_un sa;
    fillAddr(&sa, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) die("connect");
    return fd;
}

static void writeAll(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += w;
        n -= w;
    }
}

/* Returns bytes read before EOF/error (== n on success). */
static size_t readAll(int fd, char *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += r;
    }
    return got;
}

static int runDown(const char *path, long long n) {
    int fd = connectBlocking(path);
    char h[HDR];
    makeHdr(h, 'G', n);
    uint64_t t0 = nowNs();
    writeAll(fd, h, HDR);
    long long got = 0;
    while (got < n) {
        long long left = n - got;
        ssize_t r = read(fd, bigbuf, left > BIG ? BIG : (size_t)left);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += r;
    }
    uint64_t t1 = nowNs();
    close(fd);
    printf("bytes=%lld elapsed_ns=%llu cpu_ns=%llu\n", got, (unsigned long long)(t1 - t0),
           selfCpuNs());
    return got == n ? 0 : 1;
}

static int runUp(const char *path, long long n) {
    int fd = connectBlocking(path);
    char h[HDR];
    makeHdr(h, 'P', n);
    uint64_t t0 = nowNs();
    writeAll(fd, h, HDR);
    long long sent = 0;
    while (sent < n) {
        long long left = n - sent;
        ssize_t w = send(fd, bigbuf, left > BIG ? BIG : (size_t)left, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("send");
        sent += w;
    }
    char rep[HDR];
    size_t got = readAll(fd, rep, HDR);
    uint64_t t1 = nowNs();
    close(fd);
    int ok = got == HDR && rep[0] == 'K' && parseHdr(rep) == n;
    printf("bytes=%lld elapsed_ns=%llu ok=%d cpu_ns=%llu\n", sent, (unsigned long long)(t1 - t0),
           ok, selfCpuNs());
    return ok ? 0 : 1;
}

static int cmpU64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int runLatency(const char *path, long count) {
    int fd = connectBlocking(path);
    uint64_t *lat = malloc(sizeof(uint64_t) * count);
    char h[HDR], rep[HDR];
    makeHdr(h, 'Q', 0);
    long done = 0;
    uint64_t start = nowNs();
    for (; done < count; done++) {
        uint64_t t0 = nowNs();
        writeAll(fd, h, HDR);
        if (readAll(fd, rep, HDR) != HDR || rep[0] != 'R') break;
        lat[done] = nowNs() - t0;
    }
    uint64_t total = nowNs() - start;
    close(fd);
    if (done == 0) {
        printf("done=0\n");
        return 1;
    }
    qsort(lat, done, sizeof(uint64_t), cmpU64);
    printf("done=%ld elapsed_ns=%llu p50_ns=%llu p99_ns=%llu max_ns=%llu\n", done,
           (unsigned long long)total, (unsigned long long)lat[done / 2],
           (unsigned long long)lat[(done * 99) / 100], (unsigned long long)lat[done - 1]);
    return done == count ? 0 : 1;
}

/* Nonblocking connect, as Go's net package (and so the docker CLI) does it: a
 * full listen backlog shows as EAGAIN rather than a blocking wait.  Retries
 * with a short back-off until the deadline; *retries counts EAGAINs. */
static int connectRetry(const char *path, uint64_t deadline, long *retries, int *err) {
    struct sockaddr_un sa;
    fillAddr(&sa, path);
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            *err = errno;
            return -1;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) return fd;
        int e = errno;
        close(fd);
        if (e != EAGAIN || nowNs() > deadline) {
            *err = e;
            return -1;
        }
        (*retries)++;
        struct timespec ts = {0, 200000}; /* back-off, 0.2 ms */
        nanosleep(&ts, NULL);
    }
}

struct crShared {
    const char *path;
    long count;
    atomic_long next;
    atomic_long ok, failed, retriedConns, eagains;
};

static void *connrateWorker(void *arg) {
    struct crShared *s = arg;
    char h[HDR], rep[HDR];
    makeHdr(h, 'Q', 0);
    struct timeval tv = {10, 0};
    for (;;) {
        long i = atomic_fetch_add(&s->next, 1);
        if (i >= s->count) break;
        long retries = 0;
        int err = 0;
        int fd = connectRetry(s->path, nowNs() + 10000000000ull, &retries, &err);
        if (retries) {
            atomic_fetch_add(&s->retriedConns, 1);
            atomic_fetch_add(&s->eagains, retries);
        }
        if (fd < 0) {
            atomic_fetch_add(&s->failed, 1);
            continue;
        }
        setNonblock(fd, 0);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        int good = send(fd, h, HDR, MSG_NOSIGNAL) == HDR && readAll(fd, rep, HDR) == HDR &&
                   rep[0] == 'R';
        close(fd);
        atomic_fetch_add(good ? &s->ok : &s->failed, 1);
    }
    return NULL;
}

static int runConnrate(const char *path, long count, int workers) {
    struct crShared s = {.path = path, .count = count};
    pthread_t *th = calloc(workers, sizeof(pthread_t));
    uint64_t t0 = nowNs();
    for (int i = 0; i < workers; i++) pthread_create(&th[i], NULL, connrateWorker, &s);
    for (int i = 0; i < workers; i++) pthread_join(th[i], NULL);
    uint64_t t1 = nowNs();
    printf("ok=%ld failed=%ld retried=%ld eagain=%ld elapsed_ns=%llu\n", (long)s.ok,
           (long)s.failed, (long)s.retriedConns, (long)s.eagains, (unsigned long long)(t1 - t0));
    return s.failed ? 1 : 0;
}

static int runHold(const char *path, long count) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    int *got = calloc(rl.rlim_cur + 1, sizeof(int));
    char *first = calloc(rl.rlim_cur + 1, 1);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[512];
    char h[HDR], rep[HDR];
    makeHdr(h, 'Q', 0);
    long opened = 0, answered = 0, failed = 0, cfailed = 0, retries = 0;
    uint64_t t0 = nowNs(), deadline = t0 + 180000000000ull;
    struct sockaddr_un sa;
    fillAddr(&sa, path);

#define DRAIN(timeout_ms)                                                         \
    do {                                                                          \
        int n_ = epoll_wait(ep, evs, 512, (timeout_ms));                          \
        for (int i_ = 0; i_ < n_; i_++) {                                         \
            int fd_ = evs[i_].data.fd;                                            \
            ssize_t r_ = read(fd_, rep, HDR - got[fd_]);                          \
            if (r_ < 0 && errno == EAGAIN) continue;                              \
            if (r_ <= 0) {                                                        \
                failed++;                                                         \
                close(fd_); /* also leaves the epoll set */                      \
                continue;                                                         \
            }                                                                     \
            if (got[fd_] == 0) first[fd_] = rep[0];                               \
            got[fd_] += r_;                                                       \
            if (got[fd_] == HDR) {                                                \
                /* anything but our backend's answer (say, a relay's own      \
                 * error response) is a failure */                            \
                if (first[fd_] == 'R') {                                          \
                    answered++;                                                   \
                } else {                                                          \
                    failed++;                                                     \
                }                                                                 \
                epoll_ctl(ep, EPOLL_CTL_DEL, fd_, NULL);                          \
            }                                                                     \
        }                                                                         \
    } while (0)

    /* Give up when nothing moved for STALL: a relay out of descriptors just
     * stops accepting, and the backlog then answers EAGAIN for ever. */
    const uint64_t STALL = 10000000000ull;
    uint64_t lastMove = t0;
    long lastScore = 0;
#define PROGRESS()                                                                \
    do {                                                                          \
        long score_ = opened + answered + failed + cfailed;                                 \
        if (score_ != lastScore) {                                                \
            lastScore = score_;                                                   \
            lastMove = nowNs();                                                   \
        }                                                                         \
    } while (0)
    int stalled = 0;
    while (opened + cfailed < count && nowNs() < deadline) {
        PROGRESS();
        if (nowNs() - lastMove > STALL) {
            stalled = 1;
            break;
        }
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            cfailed++;
            continue;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            int e = errno;
            close(fd);
            if (e == EAGAIN) {
                retries++;
                DRAIN(1);
            } else {
                cfailed++;
            }
            continue;
        }
        opened++;
        got[fd] = 0;
        if (send(fd, h, HDR, MSG_NOSIGNAL) != HDR) {
            failed++;
            close(fd);
            continue;
        }
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
        if ((opened & 63) == 0) DRAIN(0);
    }
    uint64_t deadline2 = nowNs() + 120000000000ull;
    while (answered + failed < opened && nowNs() < deadline2 && !stalled) {
        DRAIN(100);
        PROGRESS();
        if (nowNs() - lastMove > STALL) stalled = 1;
    }
    uint64_t t1 = nowNs();
    printf("READY opened=%ld answered=%ld failed=%ld retries=%ld stalled=%d elapsed_ns=%llu\n",
           opened, answered, failed + cfailed, retries, stalled, (unsigned long long)(t1 - t0));
    fflush(stdout);
    /* Hold every connection until the harness has measured, then exit. */
    char c;
    while (read(0, &c, 1) > 0 && c != '\n') {
    }
    return 0;
}

static int runSlow(const char *path, long long n, double rate, double seconds) {
    int fd = connectBlocking(path);
    char h[HDR];
    makeHdr(h, 'G', n);
    writeAll(fd, h, HDR);
    uint64_t t0 = nowNs(), end = t0 + (uint64_t)(seconds * 1e9);
    long long got = 0;
    const size_t chunk = 65536;
    for (;;) {
        uint64_t now = nowNs();
        if (now >= end || got >= n) break;
        double due = rate * (double)(now - t0) / 1e9;
        if ((double)got + chunk <= due) {
            ssize_t r = read(fd, bigbuf, chunk);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += r;
        } else {
            /* pacing: wait until the next chunk is due */
            double waitS = ((double)got + chunk - due) / rate;
            struct timespec ts = {(time_t)waitS, (long)((waitS - (time_t)waitS) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    uint64_t t1 = nowNs();
    close(fd);
    printf("bytes=%lld elapsed_ns=%llu\n", got, (unsigned long long)(t1 - t0));
    return 0;
}

/* COUNT connections that each ask for an endless download and never read:
 * whatever the relay keeps in flight for them is pinned until they close. */
static int runStall(const char *path, long count) {
    char h[HDR];
    makeHdr(h, 'G', 999999999999999ll);
    long opened = 0, failed = 0, retries = 0;
    for (long i = 0; i < count; i++) {
        int err = 0;
        int fd = connectRetry(path, nowNs() + 60000000000ull, &retries, &err);
        if (fd < 0) {
            failed++;
            continue;
        }
        if (send(fd, h, HDR, MSG_NOSIGNAL) != HDR) {
            failed++;
            close(fd);
            continue;
        }
        opened++;
    }
    printf("READY opened=%ld failed=%ld retries=%ld\n", opened, failed, retries);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0 && c != '\n') {
    }
    return 0;
}

int main(int argc, char **argv) {
    raiseNofile();
    signal(SIGPIPE, SIG_IGN);
    memset(bigbuf, 'x', sizeof(bigbuf));
    if (argc >= 3 && !strcmp(argv[1], "server")) return runServer(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "down")) return runDown(argv[2], atoll(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "up")) return runUp(argv[2], atoll(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "latency")) return runLatency(argv[2], atol(argv[3]));
    if (argc == 5 && !strcmp(argv[1], "connrate"))
        return runConnrate(argv[2], atol(argv[3]), atoi(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "hold")) return runHold(argv[2], atol(argv[3]));
    if (argc == 6 && !strcmp(argv[1], "slow"))
        return runSlow(argv[2], atoll(argv[3]), atof(argv[4]), atof(argv[5]));
    if (argc == 4 && !strcmp(argv[1], "stall")) return runStall(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
    return 2;
}
