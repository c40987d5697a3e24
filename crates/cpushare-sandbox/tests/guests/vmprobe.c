/* The KVM probe's whole userspace: as a VM's /init, says so on the console
 * and powers the machine off. If this line appears, a real Linux guest
 * booted under that accelerator. */
#include "cpushare.h"
int main(void) {
    static const char line[] = "cpushare-vm-probe: booted\n";
    cs_write_all(1, line, sizeof line - 1);
    cs_syscall3(169, 0xfee1dead, 672274793, 0x4321fedc); /* reboot(POWER_OFF) */
    return 0;
}
