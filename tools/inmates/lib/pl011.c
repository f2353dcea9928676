/* Polled PL011 driver: no interrupts, wait on the flag register instead. */
#include "inmate.h"

#define UART_DR		0x00
#define UART_FR		0x18
#define UART_LCR_H	0x2c
#define UART_CR		0x30
#define UART_IMSC	0x38

#define FR_RXFE		(1u << 4)	/* receive FIFO empty */
#define FR_TXFF		(1u << 5)	/* transmit FIFO full */
#define LCR_H_FEN	(1u << 4)
#define LCR_H_WLEN_8	(3u << 5)
#define CR_UARTEN	(1u << 0)
#define CR_TXE		(1u << 8)
#define CR_RXE		(1u << 9)
#define IMSC_RX		(1u << 4)	/* receive */
#define IMSC_RT		(1u << 6)	/* receive timeout */

static inline volatile uint32_t *uart_reg(unsigned long offset)
{
	return (volatile uint32_t *)(UART_BASE + offset);
}

void uart_init(void)
{
	*uart_reg(UART_LCR_H) = LCR_H_WLEN_8 | LCR_H_FEN;
	*uart_reg(UART_CR) = CR_UARTEN | CR_TXE | CR_RXE;
}

/* A CONSOLE=hvc build sends every byte through the debug-console hypercall
 * instead (lib/hvc.c); everything else here, input included, is shared. */
#ifndef CONSOLE_HVC
void uart_put_raw(char c)
{
	while (*uart_reg(UART_FR) & FR_TXFF)
		;
	*uart_reg(UART_DR) = (uint8_t)c;
}
#endif

void uart_putc(char c)
{
	if (c == '\n')
		uart_put_raw('\r');
	uart_put_raw(c);
}

void uart_puts(const char *s)
{
	while (*s)
		uart_putc(*s++);
}

void uart_put_dec(uint64_t value)
{
	char digits[20];
	int n = 0;

	do {
		digits[n++] = '0' + value % 10;
		value /= 10;
	} while (value);
	while (n)
		uart_put_raw(digits[--n]);
}

int uart_getc(void)
{
	static int wakeup_enabled;

	if (!wakeup_enabled) {
		*uart_reg(UART_IMSC) = IMSC_RX | IMSC_RT;
		gic_enable_wakeup(INTID_UART);
		wakeup_enabled = 1;
	}
	/* The RX line stays asserted while the FIFO holds data, so a byte that
	 * arrives between the check and the WFI still ends the WFI. */
	while (*uart_reg(UART_FR) & FR_RXFE)
		asm volatile("wfi");
	return *uart_reg(UART_DR) & 0xff;
}
