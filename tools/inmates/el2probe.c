/* el2probe: what the hypervisor shows a cell, one line per check on the UART,
 * then power-off. Made for the simulator's EL2 layer under the QEMU engine
 * (tools/jailhouse_sim/el2), whose contract is Jailhouse's:
 *
 *   el2probe: CurrentEL 1
 *   el2probe: putc -> R                 R: 0 (console permitted) or -1 (-EPERM); sends '.'
 *   el2probe: cell_create -> -1         management hypercalls are the root cell's
 *   el2probe: code 99 -> -38            unknown hypercall: -ENOSYS
 *   el2probe: registers kept            x1-x17 survive a hypercall
 *   el2probe: psci version hvc V smc V  PSCI through both conduits (hex)
 *   el2probe: cpu_on -> R               PSCI CPU_ON of MPIDR 1 (0, or -2 with one CPU)
 *   el2probe: secondary at EL1 x0 0x5ec0   only when CPU_ON succeeded
 */
#include "inmate.h"

#define PSCI_VERSION		0x84000000ul
#define PSCI_CPU_OFF		0x84000002ul
#define PSCI_CPU_ON_64		0xc4000003ul
#define SECONDARY_CONTEXT	0x5ec0ul

static long hypercall(unsigned long code, unsigned long arg1)
{
	register unsigned long x0 asm("x0") = code;
	register unsigned long x1 asm("x1") = arg1;

	asm volatile("hvc #0x4a48" : "+r"(x0) : "r"(x1) : "memory");
	return (long)x0;
}

static int registers_kept(void)
{
	/* Every register but x0 must come back unchanged ("+r": the compiler
	 * reads them again after the call). */
	register unsigned long x0 asm("x0") = 99;
	register unsigned long x1 asm("x1") = 0x1111;
	register unsigned long x2 asm("x2") = 0x2222;
	register unsigned long x3 asm("x3") = 0x3333;
	register unsigned long x4 asm("x4") = 0x4444;
	register unsigned long x5 asm("x5") = 0x5555;
	register unsigned long x6 asm("x6") = 0x6666;
	register unsigned long x7 asm("x7") = 0x7777;
	register unsigned long x17 asm("x17") = 0x1717;

	asm volatile("hvc #0x4a48"
		     : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4), "+r"(x5), "+r"(x6), "+r"(x7),
		       "+r"(x17)
		     :: "memory");
	return x1 == 0x1111 && x2 == 0x2222 && x3 == 0x3333 && x4 == 0x4444 && x5 == 0x5555 &&
	       x6 == 0x6666 && x7 == 0x7777 && x17 == 0x1717;
}

static long psci_hvc(unsigned long function, unsigned long a1, unsigned long a2, unsigned long a3)
{
	register unsigned long x0 asm("x0") = function;
	register unsigned long x1 asm("x1") = a1;
	register unsigned long x2 asm("x2") = a2;
	register unsigned long x3 asm("x3") = a3;

	asm volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) :: "memory");
	return (long)x0;
}

static long psci_smc(unsigned long function)
{
	register unsigned long x0 asm("x0") = function;

	asm volatile("smc #0" : "+r"(x0) :: "x1", "x2", "x3", "memory");
	return (long)x0;
}

/* Written by the secondary CPU (MMU off: no caches to maintain). */
volatile uint64_t secondary_el;
volatile uint64_t secondary_x0;

void secondary_start(void);
asm(".pushsection .text\n"
    "secondary_start:\n"
    "	mrs	x1, CurrentEL\n"
    "	adr	x2, secondary_x0\n"
    "	str	x0, [x2]\n"
    "	adr	x2, secondary_el\n"
    "	str	x1, [x2]\n"
    "	ldr	x0, =0x84000002\n"		/* PSCI CPU_OFF */
    "	hvc	#0\n"
    "1:	wfe\n"
    "	b	1b\n"
    "	.ltorg\n"
    ".popsection");

static void put_signed(long value)
{
	if (value < 0) {
		uart_putc('-');
		value = -value;
	}
	uart_put_dec((uint64_t)value);
}

static void put_hex(uint64_t value)
{
	static const char digits[] = "0123456789abcdef";
	int shift = 60;

	uart_puts("0x");
	while (shift > 0 && !(value >> shift))
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		uart_putc(digits[(value >> shift) & 0xf]);
}

int main(void)
{
	uint64_t el, deadline;
	long ret;

	print_banner("el2probe");
	asm volatile("mrs %0, CurrentEL" : "=r"(el));
	uart_puts("el2probe: CurrentEL ");
	uart_put_dec(el >> 2);
	uart_puts("\nel2probe: putc -> ");
	put_signed(hypercall(8, '.'));
	uart_puts("\nel2probe: cell_create -> ");
	put_signed(hypercall(1, 0));
	uart_puts("\nel2probe: code 99 -> ");
	put_signed(hypercall(99, 0));
	uart_puts(registers_kept() ? "\nel2probe: registers kept\n" : "\nel2probe: registers CHANGED\n");
	uart_puts("el2probe: psci version hvc ");
	put_hex((uint64_t)psci_hvc(PSCI_VERSION, 0, 0, 0));
	uart_puts(" smc ");
	put_hex((uint64_t)psci_smc(PSCI_VERSION));
	uart_puts("\nel2probe: cpu_on -> ");
	ret = psci_hvc(PSCI_CPU_ON_64, 1, (unsigned long)secondary_start, SECONDARY_CONTEXT);
	put_signed(ret);
	uart_putc('\n');
	if (ret == 0) {
		deadline = timer_ticks() + timer_frequency() * 5;
		while (!secondary_el && timer_ticks() < deadline)
			;
		uart_puts("el2probe: secondary at EL");
		uart_put_dec(secondary_el >> 2);
		uart_puts(" x0 ");
		put_hex(secondary_x0);
		uart_putc('\n');
	}
	return 0;
}
