/* Console output through Jailhouse's debug-console hypercall (CONSOLE=hvc
 * builds): every byte is one `hvc #0x4a48` with x0 = 8
 * (JAILHOUSE_HC_DEBUG_CONSOLE_PUTC) and x1 = the byte, as Jailhouse's inmate
 * library sends it when the cell may use the virtual console. The bytes land
 * in the hypervisor console (`jailhouse console`), not on the cell's UART.
 * The result (0, or -EPERM for a cell without JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED)
 * is ignored, as the library does. uart_putc and friends (lib/pl011.c) turn
 * '\n' into "\r\n" on top of this; input still comes from the PL011. */
#include "inmate.h"

#define JAILHOUSE_HC_DEBUG_CONSOLE_PUTC	8

static inline long jailhouse_call_arg1(unsigned long code, unsigned long arg1)
{
	register unsigned long x0 asm("x0") = code;
	register unsigned long x1 asm("x1") = arg1;

	asm volatile("hvc #0x4a48" : "+r"(x0) : "r"(x1) : "memory");
	return (long)x0;
}

void uart_put_raw(char c)
{
	jailhouse_call_arg1(JAILHOUSE_HC_DEBUG_CONSOLE_PUTC, (unsigned char)c);
}
