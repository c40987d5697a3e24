/* Tries what a jailed program must not do; prints what each attempt got. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <unistd.h>

static void opened(const char *what, const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    printf("%s %s\n", what, f ? "OPENED" : strerror(errno));
}

int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    printf("socket %d %s\n", s, strerror(errno));
    errno = 0;
    long r = ptrace(PTRACE_TRACEME, 0, 0, 0);
    printf("ptrace %ld %s\n", r, strerror(errno));
    char *args[] = {"/bin/sh", "-c", "touch /tmp/cpushare-escaped", 0};
    execve("/bin/sh", args, 0);
    printf("execve %s\n", strerror(errno));
    pid_t p = fork();
    printf("fork %d %s\n", (int)p, strerror(errno));
    opened("shadow", "/etc/shadow", "r");
    opened("dotdot", "/work/../../etc/passwd", "r");
    opened("relative", "../../../../etc/passwd", "r");
    opened("symlink", "/work/escape/passwd", "r");
    opened("readonly", "/ro/new.txt", "w");
    return 0;
}
