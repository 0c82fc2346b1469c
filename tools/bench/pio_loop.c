/*
 * The C peer of pyvmm's exit-loop benchmark: the smallest VMM that runs the same guest
 * code (tests/stubkernel.py's pio_loop_code) in the same 64-bit boot state, and answers
 * every port-I/O exit in a tight KVM_RUN loop. It prints the microseconds per exit.
 *
 * usage: pio_loop GUEST_CODE_FILE EXPECTED_EXITS
 *   the file holds raw code placed at LOAD_ADDR and entered in long mode; it must end by
 *   writing the ACPI S5 value to port 0x600, which stops the loop.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (64ul << 20)
#define LOAD_ADDR 0x1000000ul
#define PML4 0x9000ul
#define PDPT 0xa000ul
#define PD 0xb000ul
#define GDT 0x500ul
#define ACPI_SLEEP_CONTROL 0x600

static void die(const char *what) { perror(what); exit(1); }

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s CODE_FILE EXPECTED_EXITS\n", argv[0]);
		return 2;
	}
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) die("mmap");
	struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0,
		.memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");

	FILE *f = fopen(argv[1], "rb");
	if (!f) die(argv[1]);
	size_t n = fread(mem + LOAD_ADDR, 1, MEM_SIZE - LOAD_ADDR, f);
	fclose(f);
	if (n == 0) { fprintf(stderr, "empty code file\n"); return 2; }

	/* identity map of the first GiB with 2 MiB pages, as pyvmm's boot does */
	uint64_t *pml4 = (uint64_t *)(mem + PML4), *pdpt = (uint64_t *)(mem + PDPT), *pd = (uint64_t *)(mem + PD);
	pml4[0] = PDPT | 3;
	pdpt[0] = PD | 3;
	for (int i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;
	uint64_t *gdt = (uint64_t *)(mem + GDT);
	gdt[2] = 0x00af9b000000ffffull; /* 64-bit code */
	gdt[3] = 0x00cf93000000ffffull; /* data */

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED) die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
		.present = 1, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment data = code;
	data.selector = 0x18; data.type = 3; data.l = 0; data.db = 1;
	sregs.cs = code;
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
	sregs.gdt.base = GDT; sregs.gdt.limit = 4 * 8 - 1;
	sregs.cr3 = PML4; sregs.cr4 = 1 << 5;
	sregs.cr0 = 0x80050033; sregs.efer = (1 << 8) | (1 << 10);
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = LOAD_ADDR, .rflags = 2, .rsp = 0x8ff0 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	long exits = 0;
	double t0 = now_us();
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR) continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		exits++;
		if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == ACPI_SLEEP_CONTROL)
			break;
	}
	double elapsed = now_us() - t0;
	long expected = atol(argv[2]);
	printf("exits %ld us_total %.1f us_per_exit %.3f\n", exits, elapsed, elapsed / exits);
	return exits >= expected ? 0 : 1;
}
