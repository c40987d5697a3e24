/* Hostile: turns Syscall User Dispatch off by finding nothing better than
 * calling prctl itself, then tries to fork. Dispatch sees the prctl first. */
#include "cpushare.h"
int main(void) {
    long r = cs_syscall3(157, 59, 0, 0); /* PR_SET_SYSCALL_USER_DISPATCH, off */
    (void)r;
    cs_syscall3(57, 0, 0, 0);
    return 0;
}
