/* The emulated jail's benchmark guest (an ordinary static C program):
 *   bench calls N    N getppid system calls
 *   bench read FILE  reads FILE in 1 MiB pieces
 *   bench cpu N      a CPU-bound loop (Mandelbrot points) */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static char buf[1 << 20];

int main(int argc, char **argv) {
    if (argc < 3) return 1;
    if (!strcmp(argv[1], "calls")) {
        long n = atol(argv[2]), sum = 0;
        for (long i = 0; i < n; i++) sum += syscall(SYS_getppid);
        printf("%ld\n", sum);
    } else if (!strcmp(argv[1], "read")) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return 2;
        long total = 0, n;
        while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
        printf("%ld\n", total);
    } else {
        long n = atol(argv[2]), inside = 0;
        for (long y = 0; y < n; y++)
            for (long x = 0; x < n; x++) {
                double cr = -2.0 + 2.5 * x / n, ci = -1.25 + 2.5 * y / n, zr = 0, zi = 0;
                int k = 0;
                while (k < 500 && zr * zr + zi * zi < 4) {
                    double t = zr * zr - zi * zi + cr;
                    zi = 2 * zr * zi + ci;
                    zr = t;
                    k++;
                }
                inside += k == 500;
            }
        printf("%ld\n", inside);
    }
    return 0;
}
