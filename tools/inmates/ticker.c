/* ticker: "tick N" every 100 ms (generic timer) until the cell is stopped. */
#include "inmate.h"

#define PERIOD_MS 100

int main(void)
{
	uint64_t period = timer_frequency() / 1000 * PERIOD_MS;
	uint64_t next = timer_ticks() + period;

	print_banner("ticker");
	for (uint64_t n = 1;; n++) {
		/* Deadlines advance from the previous one, so ticks do not drift. */
		sleep_until(next);
		next += period;
		uart_puts("tick ");
		uart_put_dec(n);
		uart_putc('\n');
	}
}
