/* An ordinary C program (nothing cpushare about it): allocates 100 MB, reads
 * a file, writes one, makes a directory, renames, stats, reads its environment. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 1;
    size_t n = (size_t)100 << 20;
    unsigned char *p = malloc(n);
    if (!p) { perror("malloc"); return 2; }
    for (size_t i = 0; i < n; i += 4096) p[i] = (unsigned char)(i >> 12);
    unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 4096) sum += p[i];
    free(p);
    FILE *in = fopen(argv[1], "r");
    if (!in) { perror(argv[1]); return 3; }
    FILE *out = fopen(argv[2], "w");
    if (!out) { perror(argv[2]); return 4; }
    char line[256];
    int lines = 0;
    while (fgets(line, sizeof line, in)) {
        for (char *c = line; *c; c++) if (*c >= 'a' && *c <= 'z') *c -= 32;
        fputs(line, out);
        lines++;
    }
    fclose(in);
    fclose(out);
    if (mkdir("sub", 0755)) { perror("mkdir"); return 5; }
    if (rename(argv[2], "sub/moved.txt")) { perror("rename"); return 6; }
    struct stat st;
    if (stat("sub/moved.txt", &st)) { perror("stat"); return 7; }
    const char *greeting = getenv("GREETING");
    printf("lines %d sum %lu size %ld greeting %s\n", lines, sum, (long)st.st_size, greeting ? greeting : "-");
    return 0;
}
