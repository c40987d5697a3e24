/*
 * cpushare guest SDK for C.
 *
 * A jailed program may use only three system calls: read, write and exit.
 * Its input is on fd 0, its output goes to fd 1, its log to fd 2; nothing else
 * exists. Link with crt0.c and cpushare.ld (see guest/README.md):
 *
 *   gcc -O2 -static -nostdlib -ffreestanding -fno-pie -no-pie -T cpushare.ld \
 *       crt0.c myprog.c -lgcc -o myprog
 *
 * Write `int main(void)`; its return value is the exit status.
 */
#ifndef CPUSHARE_H
#define CPUSHARE_H

#include <stddef.h>
#include <stdint.h>

static inline long cs_syscall3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

/* One read: bytes read, 0 at end of input, negative errno on error. */
static inline long cs_read(int fd, void *buf, size_t n) { return cs_syscall3(0, fd, (long)buf, (long)n); }

static inline long cs_write(int fd, const void *buf, size_t n) { return cs_syscall3(1, fd, (long)buf, (long)n); }

static inline __attribute__((noreturn)) void cs_exit(int status) {
    for (;;) cs_syscall3(60, status, 0, 0);
}

/* Reads the whole input (up to cap bytes); returns its length, or -1 if it is larger. */
static inline long cs_read_input(void *buf, size_t cap) {
    size_t got = 0;
    for (;;) {
        if (got == cap) {
            char extra;
            return cs_read(0, &extra, 1) > 0 ? -1 : (long)got;
        }
        long n = cs_read(0, (char *)buf + got, cap - got);
        if (n < 0) return n;
        if (n == 0) return (long)got;
        got += (size_t)n;
    }
}

/* Writes all of buf; returns 0, or a negative errno. */
static inline long cs_write_all(int fd, const void *buf, size_t n) {
    while (n > 0) {
        long w = cs_write(fd, buf, n);
        if (w < 0) return w;
        buf = (const char *)buf + w;
        n -= (size_t)w;
    }
    return 0;
}

static inline size_t cs_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

/* A line in the log (fd 2). */
static inline void cs_log(const char *s) {
    cs_write_all(2, s, cs_strlen(s));
    cs_write_all(2, "\n", 1);
}

/* Decimal text of v into buf (at least 21 bytes); returns its length. */
static inline size_t cs_utoa(unsigned long v, char *buf) {
    char tmp[21];
    size_t n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    for (size_t i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
    return n;
}

int main(void);

#endif
