/* memcpy_bw: memcpy bandwidth of this machine in GB/s (best of 5 copies of
 * 256 MiB between populated buffers), printed as a bare number. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
int main(void)
{
    size_t n = 256u << 20;
    char *a = malloc(n), *b = malloc(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best = 0;
    for (int i = 0; i < 5; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        memcpy(b, a, n);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        double gbs = n / s / 1e9;
        if (gbs > best) best = gbs;
        a[i] = b[i + 1];
    }
    printf("%.3f\n", best);
    return 0;
}
