/*
 * LD_PRELOAD shim for the tests: the router on a kernel before 6.5 (Debian
 * 12's 6.1), where getsockopt(SOL_SOCKET, SO_PEERPIDFD) fails with
 * ENOPROTOOPT.  Built with -DNO_SOCK_DIAG it also has no unix_diag (as
 * under a sandbox that allows AF_UNIX alone): no proof at all.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>

#define SO_PEERPIDFD_ 77

int getsockopt(int fd, int level, int name, void *value, socklen_t *length)
{
    static int (*real)(int, int, int, void *, socklen_t *);

    if (level == SOL_SOCKET && name == SO_PEERPIDFD_) {
        errno = ENOPROTOOPT;
        return -1;
    }
    if (!real)
        real = (int (*)(int, int, int, void *, socklen_t *))dlsym(RTLD_NEXT, "getsockopt");
    return real(fd, level, name, value, length);
}

#ifdef NO_SOCK_DIAG
int socket(int domain, int type, int protocol)
{
    static int (*real)(int, int, int);

    if (domain == AF_NETLINK) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    if (!real)
        real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    return real(domain, type, protocol);
}
#endif
