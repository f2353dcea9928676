/* Entry point: the first CPU starts here at the cell's reset address, at EL1,
 * MMU and caches off. Set a stack, zero .bss, install vectors that park the
 * CPU on any exception, run main(), then power the machine off. */

	.section .text.start, "ax"
	.global _start
_start:
	ldr	x0, =__stack_top
	mov	sp, x0

	adr	x0, exception_vectors
	msr	vbar_el1, x0
	isb

	ldr	x0, =__bss_start
	ldr	x1, =__bss_end
1:	cmp	x0, x1
	b.hs	2f
	str	xzr, [x0], #8
	b	1b

2:	bl	main
	bl	psci_system_off
	b	park

/* An exception (a fault on unassigned memory, an undefined instruction) ends
 * here: the CPU stops doing anything, like a CPU the hypervisor parked. */
	.global park
park:
	wfe
	b	park

	.balign 2048
exception_vectors:
	.rept 16
	b	park
	.balign 128
	.endr
