/* Echoes its input to its output, upper-cased, and logs a line. */
#include "cpushare.h"
static char buf[1 << 16];
int main(void) {
    long n = cs_read_input(buf, sizeof buf);
    if (n < 0) return 3;
    for (long i = 0; i < n; i++)
        if (buf[i] >= 'a' && buf[i] <= 'z') buf[i] -= 32;
    cs_log("hello: done");
    return cs_write_all(1, buf, (size_t)n) ? 1 : 0;
}
