/* Hostile: tries to open a file of the seller's. */
#include "cpushare.h"
int main(void) { cs_syscall3(2, (long)"/etc/shadow", 0, 0); return 0; }
