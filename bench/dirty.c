/* dirty MODE STATE_DIR MIB [ARG] -- workloads for bench/incr.sh
 *
 * rounds: MIB MiB of private anonymous memory, every page with distinct
 *   contents; "ready" when filled. On SIGUSR1 it writes new contents into
 *   ARG per mille of its pages (spread evenly, a different set each round)
 *   and writes "round N" to STATE_DIR/round.
 * loop: MIB MiB written over and over, one word per page per pass, as fast
 *   as it can; the count of passes is kept in STATE_DIR/passes (a shared
 *   mapping of a u64) so the bench reads the rate without stopping it.
 * tree: MIB MiB filled with distinct pages, then ARG fork children that keep
 *   sharing it (each writes one page of its own); "ready" lists the pids. */
#include "../fixtures/common.h"
#include <sys/mman.h>

static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }

static unsigned char *fill(size_t len, uint64_t salt)
{
    unsigned char *m = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) DIE("mmap %zu bytes: %s", len, strerror(errno));
    for (size_t off = 0; off < len; off += 8) *(uint64_t *)(m + off) = (off * 0x9E3779B97F4A7C15ull) ^ salt;
    return m;
}

int main(int argc, char **argv)
{
    if (argc < 4) DIE("usage: dirty rounds|loop|tree STATE_DIR MIB [ARG]");
    const char *mode = argv[1];
    argv[1] = argv[0];
    setup_dir(argc - 1, argv + 1);
    size_t len = strtoul(argv[3], 0, 10) << 20, pages = len / 4096;
    long arg = argc > 4 ? strtol(argv[4], 0, 10) : 10;
    if (!strcmp(mode, "rounds")) {
        unsigned char *m = fill(len, 1);
        sigset_t old = block_usr();
        signal(SIGUSR1, on_usr1);
        put_file("ready", "%d\n", getpid());
        size_t step = 1000 / (arg > 0 ? arg : 1);
        for (unsigned long r = 1;; r++) {
            while (!go) sigsuspend(&old);
            go = 0;
            for (size_t p = r % step; p < pages; p += step) *(uint64_t *)(m + p * 4096 + 8 * (r % 512)) += r;
            put_file("round", "round %lu\n", r);
        }
    }
    if (!strcmp(mode, "loop")) {
        unsigned char *m = fill(len, 2);
        char path[4200];
        snprintf(path, sizeof path, "%s/passes", g_dir);
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || ftruncate(fd, 4096) < 0) DIE("%s: %s", path, strerror(errno));
        volatile uint64_t *passes = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (passes == MAP_FAILED) DIE("mmap %s", path);
        put_file("ready", "%d\n", getpid());
        for (uint64_t n = 1;; n++) {
            for (size_t p = 0; p < pages; p++) *(volatile uint64_t *)(m + p * 4096 + 8 * (n % 512)) = n;
            *passes = n;
        }
    }
    if (!strcmp(mode, "tree")) {
        unsigned char *m = fill(len, 3);
        char pids[4096] = "";
        size_t at = 0;
        for (long i = 0; i < arg; i++) {
            pid_t c = fork();
            if (c < 0) DIE("fork: %s", strerror(errno));
            if (c == 0) {
                m[i * 4096] ^= 0xff;
                for (;;) pause();
            }
            at += snprintf(pids + at, sizeof pids - at, "%d ", c);
        }
        put_file("ready", "%d %s\n", getpid(), pids);
        for (;;) pause();
    }
    DIE("unknown mode %s", mode);
}
