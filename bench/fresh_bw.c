/* fresh_bw DIR MIB: the two floors of a dump/restore of MIB MiB on this
 * machine, in GB/s, printed as "FIRST_TOUCH TMPFS_WRITE":
 *  - first touch: memset of a fresh anonymous mapping (every page faulted in
 *    and cleared; what a restore pays for the restored process's memory);
 *  - tmpfs write: writing a new file in DIR in 8 MiB writes from a warm
 *    buffer (every page of the file newly allocated; what a dump pays for
 *    an image on /dev/shm).
 * On a VM whose host backs guest memory lazily, both are far below memcpy. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: fresh_bw DIR MIB\n"); return 2; }
    size_t n = strtoul(argv[2], 0, 10) << 20, b = 8u << 20;
    char *a = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) { perror("mmap"); return 1; }
    double t0 = now();
    memset(a, 1, n);
    double touch = n / (now() - t0) / 1e9;
    munmap(a, n);

    char path[4096];
    snprintf(path, sizeof path, "%s/fresh_bw.%d", argv[1], (int)getpid());
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0600);
    if (fd < 0) { perror(path); return 1; }
    char *buf = malloc(b);
    memset(buf, 3, b);
    t0 = now();
    for (size_t o = 0; o < n; o += b)
        if (pwrite(fd, buf, b, o) != (ssize_t)b) { perror("pwrite"); unlink(path); return 1; }
    double wr = n / (now() - t0) / 1e9;
    close(fd);
    unlink(path);
    printf("%.3f %.3f\n", touch, wr);
    return 0;
}
