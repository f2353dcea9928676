/* reset: print, then ask for a system reset (PSCI SYSTEM_RESET). A cell may not
 * reset the board: the simulator treats it as a fault and parks the cell. */
#include "inmate.h"

int main(void)
{
	print_banner("reset");
	uart_puts("reset: requesting a system reset\n");
	psci_system_reset();
}
