/* Hostile: needs 2 GiB of memory (a huge .bss). */
#include "cpushare.h"
static char big[2UL << 30];
int main(void) { big[0] = 1; big[sizeof big - 1] = 1; return big[12345]; }
