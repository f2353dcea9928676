/* hello: a few lines on the UART, then PSCI power-off. */
#include "inmate.h"

int main(void)
{
	print_banner("hello");
	uart_puts("hello: running at EL1 on the cell's first CPU\n");
	uart_puts("hello: timer frequency ");
	uart_put_dec(timer_frequency());
	uart_puts(" Hz\n");
	uart_puts("hello: done, powering off\n");
	return 0;
}
