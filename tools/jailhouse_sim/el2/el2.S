/*
 * The simulator's EL2 layer: the piece of "Jailhouse" that runs in front of a
 * raw-image cell under the QEMU engine (-M virt,virtualization=on, no EL3).
 *
 * QEMU starts the first CPU here, at EL2, MMU off. The layer configures EL2
 * so the cell runs at EL1 as it does on Jailhouse, then ERETs to the cell's
 * reset address. From then on it only runs when the cell traps to EL2:
 *
 *   hvc #0x4a48  Jailhouse hypercall, code in x0, argument in x1, result in x0
 *                (every other register is preserved):
 *                  8 DEBUG_CONSOLE_PUTC: if the cell may use the virtual
 *                    console, x1's low byte goes out on the console channel
 *                    (ARM semihosting SYS_WRITEC, which QEMU sends to the
 *                    chardev the engine reads) and x0 = 0; otherwise x0 =
 *                    -EPERM and nothing is sent;
 *                  0-4, 6 (management calls) -EPERM: only the root cell may;
 *                  anything else -ENOSYS (5 and 7 are not modelled).
 *   hvc #0       PSCI (a simulator convenience: Jailhouse takes PSCI only as
 *                SMC, QEMU's own firmware-less guests use HVC): forwarded to
 *   smc #0       QEMU's built-in PSCI (its conduit is SMC when EL2 exists),
 *                x0-x3 as the cell passed them, x0 = the result. CPU_ON is
 *                redirected through secondary_entry below, so a secondary
 *                CPU gets the same EL2 set-up and starts at EL1 too.
 *   anything else: Jailhouse's "FATAL: forbidden access" (an HVC with another
 *                immediate) or "FATAL: unhandled trap": the layer ends QEMU
 *                with semihosting SYS_EXIT, status 0x80 | forbidden << 6 | EC,
 *                which the engine turns into that console line and parked CPUs.
 *
 * The image is position independent (only PC-relative addressing): the engine
 * places it where it likes and patches the header below. Everything the layer
 * writes (per-CPU stacks, CPU_ON mailboxes) is inside the image.
 */

#define HCR_RW		(1 << 31)	/* EL1 is AArch64 */
#define HCR_TSC		(1 << 19)	/* SMC from EL1 traps to EL2 (PSCI, as Jailhouse) */

#define CNTHCTL_EL1PCTEN (1 << 0)	/* EL1/EL0 may read the physical counter */
#define CNTHCTL_EL1PCEN	(1 << 1)	/* EL1/EL0 may use the physical timer */

/* CPTR_EL2 with its RES1 bits (13:12, 9:0) and no trap bits: TFP (10, FP/SIMD),
 * TTA (20, trace) and TCPAC (31, CPACR_EL1 accesses) all 0. */
#define CPTR_EL2_NO_TRAPS 0x33ff

#define SCTLR_EL2_RES1	0x30c50830	/* MMU, caches, alignment checks off; little endian */
#define SCTLR_EL1_RES1	0x30d00800	/* the cell starts with MMU and caches off, as on Jailhouse */

#define ICC_SRE_EL2_SRE	(1 << 0)	/* GICv3 system register interface at EL2 */
#define ICC_SRE_EL2_ENABLE (1 << 3)	/* ... and EL1 may enable its own (ICC_SRE_EL1) */

#define SPSR_EL1H_MASKED 0x3c5		/* EL1h, D, A, I, F masked: how a cell CPU starts */

#define EC_HVC64	0x16
#define EC_SMC64	0x17
#define JAILHOUSE_HVC_CODE 0x4a48
#define HC_HYPERVISOR_GET_INFO 5
#define HC_DEBUG_CONSOLE_PUTC 8
#define EPERM		1
#define ENOSYS		38

#define PSCI_CPU_ON_32	0x84000003
#define PSCI_CPU_ON_64	0xc4000003

#define SEMIHOST_SYS_WRITEC 0x03
#define SEMIHOST_SYS_EXIT 0x18
#define ADP_STOPPED_APPLICATION_EXIT 0x20026

#define MAX_CPUS	16	/* MPIDR.Aff0 on QEMU virt with GICv3 (16 CPUs per cluster) */
#define STACK_SIZE	256

	.text
	.global _start
_start:
	b	primary_entry

/* The header the engine patches (offsets are fixed: see el2/__init__.py). */
	.balign 8
guest_entry:				/* offset 8: the cell's reset address */
	.quad	0
flags:					/* offset 16: bit 0 = virtual console permitted */
	.quad	0
	.ascii	"RPHI-EL2"		/* offset 24: magic */

primary_entry:
	ldr	x0, guest_entry
	mov	x1, xzr			/* a cell CPU starts with x0 = 0 */
	b	enter_guest

/* A CPU started by the cell's PSCI CPU_ON: QEMU's PSCI starts it here at EL2
 * (the highest EL it provides). Its mailbox holds the cell's entry and
 * context id. */
secondary_entry:
	mrs	x2, mpidr_el1
	and	x2, x2, #(MAX_CPUS - 1)
	adr	x3, cpu_on_mailboxes
	add	x3, x3, x2, lsl #4
	ldp	x0, x1, [x3]
	/* fall through */

/* x0 = where the cell runs at EL1, x1 = the cell's x0 there. */
enter_guest:
	/* This CPU's stack for the trap handler (SP_EL2; EL2 runs on SP_ELx). */
	mrs	x2, mpidr_el1
	and	x2, x2, #(MAX_CPUS - 1)
	add	x2, x2, #1
	adr	x3, stacks
	add	x3, x3, x2, lsl #8	/* top of stack number Aff0 (STACK_SIZE 256) */
	mov	sp, x3

	adr	x2, vectors		/* trap handlers */
	msr	vbar_el2, x2
	ldr	x2, =SCTLR_EL2_RES1	/* EL2 itself: MMU and caches off */
	msr	sctlr_el2, x2

	ldr	x2, =(HCR_RW | HCR_TSC)	/* AArch64 EL1, SMC trapped; VM (stage 2), IMO/FMO/AMO,
					   TGE, TWI/TWE all 0: no translation, interrupts and
					   WFI/WFE go straight to/through EL1 */
	msr	hcr_el2, x2
	msr	vttbr_el2, xzr		/* no stage-2 tables (stage 2 is off anyway) */
	mov	x2, #(CNTHCTL_EL1PCTEN | CNTHCTL_EL1PCEN)
	msr	cnthctl_el2, x2		/* EL1 may use the physical counter and timer */
	msr	cntvoff_el2, xzr	/* virtual counter == physical counter */
	mov	x2, #CPTR_EL2_NO_TRAPS
	msr	cptr_el2, x2		/* FP/SIMD and CPACR_EL1 do not trap */
	msr	hstr_el2, xzr		/* no AArch32 cp15 traps */
	mrs	x2, midr_el1
	msr	vpidr_el2, x2		/* EL1 reads of MIDR_EL1 see the real core */
	mrs	x2, mpidr_el1
	msr	vmpidr_el2, x2		/* ... and of MPIDR_EL1 the real affinity */

	mrs	x2, id_aa64pfr0_el1	/* GICv3 system register interface present? */
	ubfx	x2, x2, #24, #4
	cbz	x2, 1f
	mov	x2, #(ICC_SRE_EL2_SRE | ICC_SRE_EL2_ENABLE)
	msr	S3_4_C12_C9_5, x2	/* ICC_SRE_EL2: let EL1 use ICC_* system registers */
1:
	ldr	x2, =SCTLR_EL1_RES1
	msr	sctlr_el1, x2		/* the cell's MMU and caches off */

	msr	elr_el2, x0		/* ERET target: the cell's entry ... */
	mov	x2, #SPSR_EL1H_MASKED
	msr	spsr_el2, x2		/* ... at EL1h, exceptions masked */
	mov	x0, x1
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	isb
	eret

	.ltorg

/* ---------------------------------------------------------------- traps */

/* Frame on the EL2 stack while handling a trap: the cell's x1-x5 and a byte
 * for SYS_WRITEC to read. */
#define FRAME_X1	0
#define FRAME_X2	8
#define FRAME_X3	16
#define FRAME_X4	24
#define FRAME_X5	32
#define FRAME_CHAR	40
#define FRAME_SIZE	48

lower_sync:
	sub	sp, sp, #FRAME_SIZE
	str	x1, [sp, #FRAME_X1]
	stp	x2, x3, [sp, #FRAME_X2]
	stp	x4, x5, [sp, #FRAME_X4]
	mrs	x2, esr_el2
	ubfx	x3, x2, #26, #6		/* EC */
	and	x4, x2, #0xffff		/* ISS[15:0]: the HVC/SMC immediate */
	cmp	x3, #EC_HVC64
	b.eq	hvc
	cmp	x3, #EC_SMC64
	b.ne	unhandled
	/* A trapped SMC returns to the SMC itself: step over it. */
	mrs	x5, elr_el2
	add	x5, x5, #4
	msr	elr_el2, x5
	cbz	x4, psci
	b	unhandled

hvc:
	cbz	x4, psci
	mov	x5, #JAILHOUSE_HVC_CODE
	cmp	x4, x5
	b.ne	forbidden

	cmp	x0, #HC_DEBUG_CONSOLE_PUTC
	b.eq	putc
	cmp	x0, #HC_HYPERVISOR_GET_INFO
	b.eq	enosys
	cmp	x0, #6
	b.ls	eperm			/* 0-4, 6: cell management, root cell only */
enosys:
	mov	x0, #-ENOSYS
	b	return

putc:
	ldr	x5, flags
	tbz	x5, #0, eperm
	strb	w1, [sp, #FRAME_CHAR]
	add	x1, sp, #FRAME_CHAR
	mov	x0, #SEMIHOST_SYS_WRITEC
	hlt	#0xf000			/* QEMU writes the byte at [x1] to the console chardev */
	mov	x0, xzr
	b	return

eperm:
	mov	x0, #-EPERM
	b	return

psci:
	/* The cell's x2 and x3 are arguments too. */
	ldp	x2, x3, [sp, #FRAME_X2]
	mov	w4, w0
	ldr	w5, =PSCI_CPU_ON_32
	cmp	w4, w5
	b.eq	cpu_on
	ldr	w5, =PSCI_CPU_ON_64
	cmp	w4, w5
	b.eq	cpu_on
	smc	#0
	b	return

cpu_on:	/* x1 = target MPIDR, x2 = entry, x3 = context id */
	and	x4, x1, #(MAX_CPUS - 1)
	adr	x5, cpu_on_mailboxes
	add	x5, x5, x4, lsl #4
	stp	x2, x3, [x5]
	dsb	sy
	adr	x2, secondary_entry
	smc	#0
	b	return

return:
	ldr	x1, [sp, #FRAME_X1]
	ldp	x2, x3, [sp, #FRAME_X2]
	ldp	x4, x5, [sp, #FRAME_X4]
	add	sp, sp, #FRAME_SIZE
	eret

forbidden:
	orr	x3, x3, #0x40
unhandled:
	/* x3 = EC (| 0x40 if forbidden): QEMU exits with 0x80 | x3. */
	orr	x3, x3, #0x80
	ldr	x2, =ADP_STOPPED_APPLICATION_EXIT
	stp	x2, x3, [sp, #-16]!
	mov	x1, sp
	mov	x0, #SEMIHOST_SYS_EXIT
	hlt	#0xf000
	b	park

park:	/* an exception at EL2 itself: stop this CPU */
	wfe
	b	park

	.ltorg

/* VBAR_EL2: 16 entries of 128 bytes; only "lower EL, AArch64, synchronous" is
 * expected (interrupts are not routed to EL2, EL1 is AArch64). */
	.balign 2048
vectors:
	.rept	8			/* current EL with SP_EL0 / SP_ELx */
	b	park
	.balign 128
	.endr
	b	lower_sync		/* lower EL, AArch64: synchronous */
	.balign 128
	.rept	7			/* lower EL: IRQ, FIQ, SError; AArch32 */
	b	park
	.balign 128
	.endr

	.balign 16
cpu_on_mailboxes:			/* per Aff0: entry, context id */
	.skip	16 * MAX_CPUS
stacks:
	.skip	STACK_SIZE * MAX_CPUS
	.global __el2_end
__el2_end:
