/* Just enough GICv3 to sleep: route one interrupt to the first CPU so WFI wakes
 * when it is pending. Interrupts stay masked in PSTATE (never taken): a masked,
 * pending interrupt still ends WFI, and the level-sensitive lines used here
 * drop by themselves (timer re-armed, UART FIFO read), so nothing is
 * acknowledged. Security is disabled on QEMU virt without EL3 (GICD_CTLR.DS),
 * so there is a single interrupt group view. */
#include "inmate.h"

#define GICD_CTLR		0x0000
#define GICD_IGROUPR(n)		(0x0080 + 4 * ((n) / 32))
#define GICD_ISENABLER(n)	(0x0100 + 4 * ((n) / 32))
#define GICD_IROUTER(n)		(0x6000 + 8 * (n))
#define GICD_CTLR_GRP1		(1u << 1)
#define GICD_CTLR_ARE		(1u << 4)
#define GICD_CTLR_RWP		(1u << 31)

#define GICR_WAKER		0x0014
#define GICR_SGI_FRAME		0x10000
#define GICR_IGROUPR0		(GICR_SGI_FRAME + 0x0080)
#define GICR_ISENABLER0		(GICR_SGI_FRAME + 0x0100)
#define WAKER_PROCESSOR_SLEEP	(1u << 1)
#define WAKER_CHILDREN_ASLEEP	(1u << 2)

static inline volatile uint32_t *gicd(unsigned long offset)
{
	return (volatile uint32_t *)(GICD_BASE + offset);
}

/* The first CPU's redistributor is the first one in the region. */
static inline volatile uint32_t *gicr(unsigned long offset)
{
	return (volatile uint32_t *)(GICR_BASE + offset);
}

static int gic_ready;

static void gic_init(void)
{
	uint64_t sre;

	if (gic_ready)
		return;
	*gicd(GICD_CTLR) |= GICD_CTLR_ARE | GICD_CTLR_GRP1;
	while (*gicd(GICD_CTLR) & GICD_CTLR_RWP)
		;
	*gicr(GICR_WAKER) &= ~WAKER_PROCESSOR_SLEEP;
	while (*gicr(GICR_WAKER) & WAKER_CHILDREN_ASLEEP)
		;
	asm volatile("mrs %0, S3_0_C12_C12_5" : "=r"(sre));	/* ICC_SRE_EL1 */
	asm volatile("msr S3_0_C12_C12_5, %0; isb" :: "r"(sre | 1));
	asm volatile("msr S3_0_C4_C6_0, %0" :: "r"(0xffull));	/* ICC_PMR_EL1: let all through */
	asm volatile("msr S3_0_C12_C12_7, %0; isb" :: "r"(1ull));	/* ICC_IGRPEN1_EL1 */
	gic_ready = 1;
}

void gic_enable_wakeup(unsigned int intid)
{
	gic_init();
	if (intid < 32) {
		*gicr(GICR_IGROUPR0) |= 1u << intid;
		*gicr(GICR_ISENABLER0) = 1u << intid;
	} else {
		*gicd(GICD_IGROUPR(intid)) |= 1u << (intid % 32);
		*(volatile uint64_t *)(GICD_BASE + (unsigned long)GICD_IROUTER(intid)) = 0;	/* affinity 0.0.0.0 */
		*gicd(GICD_ISENABLER(intid)) = 1u << (intid % 32);
	}
}
