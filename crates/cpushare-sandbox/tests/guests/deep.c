/* Hostile: unbounded recursion. */
#include "cpushare.h"
static int down(int n) { volatile char pad[4096]; pad[0] = (char)n; return down(n + 1) + pad[0]; }
int main(void) { return down(0); }
