/* Generic timer, PSCI power-off and the common banner. */
#include "inmate.h"

#define PSCI_0_2_FN_SYSTEM_OFF	0x84000008ul
#define PSCI_0_2_FN_SYSTEM_RESET	0x84000009ul

uint64_t timer_ticks(void)
{
	uint64_t ticks;

	/* The ISB keeps the counter read from being hoisted above earlier code. */
	asm volatile("isb; mrs %0, cntvct_el0" : "=r"(ticks) :: "memory");
	return ticks;
}

uint64_t timer_frequency(void)
{
	uint64_t frequency;

	asm volatile("mrs %0, cntfrq_el0" : "=r"(frequency));
	return frequency;
}

#define CNTV_CTL_ENABLE	(1ull << 0)

void sleep_until(uint64_t ticks)
{
	static int wakeup_enabled;

	if (!wakeup_enabled) {
		gic_enable_wakeup(INTID_VIRTUAL_TIMER);
		wakeup_enabled = 1;
	}
	asm volatile("msr cntv_cval_el0, %0" :: "r"(ticks));
	asm volatile("msr cntv_ctl_el0, %0; isb" :: "r"(CNTV_CTL_ENABLE));
	while (timer_ticks() < ticks)
		asm volatile("wfi");
	/* Disarm, so the expired timer does not keep waking later WFIs. */
	asm volatile("msr cntv_ctl_el0, xzr; isb");
}

void delay_ms(uint64_t ms)
{
	sleep_until(timer_ticks() + timer_frequency() / 1000 * ms);
}

static void __attribute__((noreturn)) psci_call_no_return(uint64_t function)
{
	register uint64_t x0 asm("x0") = function;

	asm volatile("hvc #0" : "+r"(x0) :: "memory");
	/* Only reached when nobody implements the call: stop here. */
	for (;;)
		asm volatile("wfe");
}

void psci_system_off(void)
{
	psci_call_no_return(PSCI_0_2_FN_SYSTEM_OFF);
}

void psci_system_reset(void)
{
	psci_call_no_return(PSCI_0_2_FN_SYSTEM_RESET);
}

void print_banner(const char *name)
{
	uart_init();
	uart_puts("Hello from runphi inmate ");
	uart_puts(name);
	uart_putc('\n');
}
