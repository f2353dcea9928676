/* crash: print, then store to unassigned guest-physical memory. The access is
 * rejected and the CPU parks in the exception vector (see start.S). */
#include "inmate.h"

#define UNASSIGNED_ADDRESS 0x0c000000ul

int main(void)
{
	print_banner("crash");
	uart_puts("crash: storing to 0x0c000000 (unassigned)\n");
	*(volatile uint32_t *)UNASSIGNED_ADDRESS = 0xdeadbeef;
	uart_puts("crash: still alive, which is wrong\n");
	return 1;
}
