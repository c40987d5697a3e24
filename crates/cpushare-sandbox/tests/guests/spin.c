/* Hostile: never ends. */
#include "cpushare.h"
int main(void) { volatile unsigned long x = 0; for (;;) x++; }
