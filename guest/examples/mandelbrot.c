/*
 * mandelbrot: renders one tile of the Mandelbrot set.
 *
 * Input (text): "X0 Y0 STEP WIDTH HEIGHT MAXITER", e.g. "-2.0 -1.2 0.005 64 64 256".
 * Pixel (i, j) is the point X0 + i*STEP + (Y0 + j*STEP)i.
 * Output: a binary PGM image of the tile: black inside the set; outside, the
 * slower a point escapes, the brighter (1 + 254k/(k+24) for k iterations).
 */
#include "cpushare.h"

static char input[256];
static unsigned char image[4096 * 4096];

static const char *skip(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\t') p++;
    return p;
}

static const char *number(const char *p, double *out) {
    p = skip(p);
    int neg = 0;
    if (*p == '-') { neg = 1; p++; }
    double v = 0, scale = 1;
    int digits = 0;
    while (*p >= '0' && *p <= '9') { v = v * 10 + (*p++ - '0'); digits++; }
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') { scale /= 10; v += (*p++ - '0') * scale; digits++; }
    }
    if (!digits) return 0;
    *out = neg ? -v : v;
    return p;
}

int main(void) {
    long n = cs_read_input(input, sizeof input - 1);
    if (n <= 0) { cs_log("mandelbrot: expected \"X0 Y0 STEP WIDTH HEIGHT MAXITER\" on input"); return 2; }
    input[n] = 0;
    double v[6];
    const char *p = input;
    for (int i = 0; i < 6; i++) {
        p = number(p, &v[i]);
        if (!p) { cs_log("mandelbrot: expected six numbers: X0 Y0 STEP WIDTH HEIGHT MAXITER"); return 2; }
    }
    long w = (long)v[3], h = (long)v[4], max = (long)v[5];
    if (w < 1 || h < 1 || w * h > (long)sizeof image || max < 1) { cs_log("mandelbrot: tile too large or empty"); return 2; }
    for (long j = 0; j < h; j++) {
        double ci = v[1] + j * v[2];
        for (long i = 0; i < w; i++) {
            double cr = v[0] + i * v[2], zr = 0, zi = 0;
            long k = 0;
            while (k < max && zr * zr + zi * zi < 4.0) {
                double t = zr * zr - zi * zi + cr;
                zi = 2 * zr * zi + ci;
                zr = t;
                k++;
            }
            image[j * w + i] = k == max ? 0 : (unsigned char)(1 + (254 * k) / (k + 24));
        }
    }
    char head[64] = "P5\n";
    size_t at = 3;
    at += cs_utoa((unsigned long)w, head + at);
    head[at++] = ' ';
    at += cs_utoa((unsigned long)h, head + at);
    const char *tail = "\n255\n";
    while (*tail) head[at++] = *tail++;
    if (cs_write_all(1, head, at) || cs_write_all(1, image, (size_t)(w * h))) return 1;
    return 0;
}
