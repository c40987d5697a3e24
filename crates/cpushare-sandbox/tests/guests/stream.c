/* Stream mode: upper-cases each fragment. Some inputs misbehave on purpose:
 * "crash" faults, "fork" calls fork, "spin" never ends, "exit7" exits the whole
 * program, "flood" writes far more than any lease allows, "log" logs a line,
 * "fail" ends the fragment with status 3. */
#include "cpushare.h"
static char buf[1 << 16];

static int is(const char *s, long n) {
    long i = 0;
    for (; s[i]; i++)
        if (i >= n || buf[i] != s[i]) return 0;
    return i == n;
}

int main(void) {
    long n;
    while ((n = cs_stream_next(buf, sizeof buf)) != CS_STREAM_END) {
        if (n == CS_STREAM_TOO_LARGE) { cs_log("stream: input too large"); cs_stream_end(2); continue; }
        if (is("crash", n)) *(volatile int *)8 = 1;
        if (is("fork", n)) cs_syscall3(57, 0, 0, 0);
        if (is("spin", n)) for (;;) __asm__ volatile("");
        if (is("exit7", n)) cs_exit(7);
        if (is("flood", n)) for (;;) cs_stream_write(buf, sizeof buf);
        if (is("log", n)) cs_log("stream: a line for this fragment");
        if (is("fail", n)) { cs_stream_end(3); continue; }
        for (long i = 0; i < n; i++)
            if (buf[i] >= 'a' && buf[i] <= 'z') buf[i] -= 32;
        cs_stream_write(buf, (size_t)n);
        cs_stream_end(0);
    }
    return 0;
}
