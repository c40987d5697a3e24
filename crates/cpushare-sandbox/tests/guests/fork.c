/* Hostile: tries to fork. */
#include "cpushare.h"
int main(void) { cs_syscall3(57, 0, 0, 0); return 0; }
