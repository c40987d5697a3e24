/* Hostile: writes output forever. */
#include "cpushare.h"
static char block[1 << 16];
int main(void) { for (;;) cs_write_all(1, block, sizeof block); }
