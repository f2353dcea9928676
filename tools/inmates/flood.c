/* flood: FLOOD_BYTES bytes of a known pattern as fast as the UART takes them,
 * sent raw (no newline translation), then a trailer line and power-off.
 * Byte i of the flood is PATTERN[i % 64]. */
#include "inmate.h"

static const char PATTERN[] =
	"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/";

int main(void)
{
	print_banner("flood");
	uart_puts("flood: sending ");
	uart_put_dec(FLOOD_BYTES);
	uart_puts(" bytes\n");
	for (uint64_t i = 0; i < FLOOD_BYTES; i++)
		uart_put_raw(PATTERN[i % 64]);
	uart_puts("\nflood: done ");
	uart_put_dec(FLOOD_BYTES);
	uart_puts(" bytes\n");
	return 0;
}
