/* Buggy: writes through a null pointer. */
#include "cpushare.h"
int main(void) { *(volatile int *)0 = 1; return 0; }
