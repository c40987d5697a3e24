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

/*
 * Stream mode (run with `cpushare run --stream`): one jail serves many
 * fragments, which matters when fragments are small (starting a jail costs
 * about half a millisecond). The program loops:
 *
 *   long n;
 *   while ((n = cs_stream_next(buf, sizeof buf)) != CS_STREAM_END) {
 *       if (n == CS_STREAM_TOO_LARGE) { cs_log("too large"); cs_stream_end(2); continue; }
 *       ... cs_stream_write(result, len); ...
 *       cs_stream_end(0);
 *   }
 *   return 0;
 *
 * Each fragment's log is what the program writes to fd 2 while it runs.
 * Inputs arrive on fd 0 as an 8-byte little-endian length and the bytes;
 * output goes to fd 1 as records (1, u32 length, bytes) and the end of a
 * fragment as (2, i32 status).
 */
#define CS_STREAM_END (-1L)
#define CS_STREAM_TOO_LARGE (-2L)

/* Reads exactly n bytes; 0 on success, -1 at end of input or on error. */
static inline int cs_read_exact(int fd, void *buf, size_t n) {
    while (n > 0) {
        long r = cs_read(fd, buf, n);
        if (r <= 0) return -1;
        buf = (char *)buf + r;
        n -= (size_t)r;
    }
    return 0;
}

/* The next fragment's input into buf: its length, CS_STREAM_END when there is
 * no more work, or CS_STREAM_TOO_LARGE (the input was skipped; end the
 * fragment with a failure status). */
static inline long cs_stream_next(void *buf, size_t cap) {
    unsigned char head[8];
    if (cs_read_exact(0, head, 8)) return CS_STREAM_END;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | head[i];
    if (n > cap) {
        char skip[4096];
        while (n > 0) {
            size_t step = n < sizeof skip ? (size_t)n : sizeof skip;
            if (cs_read_exact(0, skip, step)) return CS_STREAM_END;
            n -= step;
        }
        return CS_STREAM_TOO_LARGE;
    }
    if (cs_read_exact(0, buf, (size_t)n)) return CS_STREAM_END;
    return (long)n;
}

static inline void cs_stream_record(unsigned char kind, uint32_t v) {
    unsigned char head[5] = {kind, (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    cs_write_all(1, head, 5);
}

/* Part of the current fragment's output. */
static inline long cs_stream_write(const void *buf, size_t n) {
    while (n > 0) {
        uint32_t step = n > 0x40000000u ? 0x40000000u : (uint32_t)n;
        cs_stream_record(1, step);
        long r = cs_write_all(1, buf, step);
        if (r) return r;
        buf = (const char *)buf + step;
        n -= step;
    }
    return 0;
}

/* The current fragment is done: 0 for success, anything else fails it. */
static inline void cs_stream_end(int status) { cs_stream_record(2, (uint32_t)status); }

int main(void);

#endif
