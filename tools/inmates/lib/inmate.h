/* The few services every test inmate uses: a polled PL011, the generic timer,
 * PSCI power-off. Freestanding: no libc. */
#ifndef RUNPHI_INMATE_H
#define RUNPHI_INMATE_H

#include <stdint.h>
#include <stddef.h>

/* PL011 */
void uart_init(void);
void uart_put_raw(char c);              /* one byte, no translation */
void uart_putc(char c);                 /* '\n' goes out as "\r\n" */
void uart_puts(const char *s);
void uart_put_dec(uint64_t value);
int uart_getc(void);                    /* sleeps (WFI) until a byte arrives, returns it */

/* GICv3: let interrupt `intid` end a WFI on the first CPU (never taken). */
void gic_enable_wakeup(unsigned int intid);
#define INTID_VIRTUAL_TIMER	27
#define INTID_UART		33

/* Generic timer */
uint64_t timer_ticks(void);             /* CNTVCT_EL0 */
uint64_t timer_frequency(void);         /* CNTFRQ_EL0, ticks per second */
void sleep_until(uint64_t ticks);       /* WFI until CNTVCT_EL0 >= ticks */
void delay_ms(uint64_t ms);

/* PSCI SYSTEM_OFF / SYSTEM_RESET through the hypervisor call conduit; do not return. */
void psci_system_off(void) __attribute__((noreturn));
void psci_system_reset(void) __attribute__((noreturn));

/* Banner every program prints first: "Hello from runphi inmate <name>". */
void print_banner(const char *name);

#endif
