"""The KVM user-space ABI: every struct, ioctl number and constant pyvmm uses, in one place.

Names follow the kernel's `include/uapi/linux/kvm.h` and `arch/x86/include/uapi/asm/kvm.h`.
The structs are declared for cffi in ABI mode (no compiler needed at install time); the
ioctl numbers are computed from the struct sizes the same way the kernel's _IOW/_IOR macros
do, so a layout mistake shows up as a wrong ioctl number (EINVAL/ENOTTY) rather than silently.
"""

from __future__ import annotations

import cffi

ffi = cffi.FFI()
ffi.cdef(
    r"""
    /* libc */
    int ioctl(int fd, unsigned long request, void *arg);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int mprotect(void *addr, size_t len, int prot);
    int madvise(void *addr, size_t length, int advice);
    void *memset(void *s, int c, size_t n);
    void *memmove(void *dest, const void *src, size_t n);
    int pthread_kill(unsigned long thread, int sig);
    int fallocate(int fd, int mode, long offset, long len);

    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t ftwx;
        uint8_t pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_xsave {
        uint32_t region[1024];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_irq_level {
        union {
            uint32_t irq;
            int32_t status;
        };
        uint32_t level;
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t pad[16];
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };

    struct kvm_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t flags;
        uint32_t devid;
        uint8_t pad[12];
    };

    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };

    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t devid;
    };

    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };

    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };

    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t pad[64];
    };

    struct kvm_vcpu_events {
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t has_error_code;
            uint8_t pending;
            uint32_t error_code;
        } exception;
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t soft;
            uint8_t shadow;
        } interrupt;
        struct {
            uint8_t injected;
            uint8_t pending;
            uint8_t masked;
            uint8_t pad;
        } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct {
            uint8_t smm;
            uint8_t pending;
            uint8_t smm_inside_nmi;
            uint8_t latched_init;
        } smi;
        struct {
            uint8_t pending;
        } triple_fault;
        uint8_t reserved[26];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };

    struct kvm_clock_data {
        uint64_t clock;
        uint32_t flags;
        uint32_t pad0;
        uint64_t realtime;
        uint64_t host_tsc;
        uint32_t pad[4];
    };

    struct kvm_device_attr {
        uint32_t flags;
        uint32_t group;
        uint64_t attr;
        uint64_t addr;
    };

    struct kvm_mp_state {
        uint32_t mp_state;
    };

    struct kvm_msr_filter_range {
        uint32_t flags;
        uint32_t nmsrs;
        uint32_t base;
        uint8_t *bitmap;
    };

    struct kvm_msr_filter {
        uint32_t flags;
        struct kvm_msr_filter_range ranges[16];
    };

    struct kvm_pic_state {
        uint8_t bytes[24];
    };

    struct kvm_irqchip {
        uint32_t chip_id;
        uint32_t pad;
        char chip[512];
    };

    struct kvm_run_io {
        uint8_t direction;
        uint8_t size;
        uint16_t port;
        uint32_t count;
        uint64_t data_offset;
    };

    struct kvm_run_mmio {
        uint64_t phys_addr;
        uint8_t data[8];
        uint32_t len;
        uint8_t is_write;
    };

    struct kvm_run_internal {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_emulation_failure {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t flags;
        uint8_t insn_size;
        uint8_t insn_bytes[15];
    };

    struct kvm_run_msr {
        uint8_t error;
        uint8_t pad[7];
        uint32_t reason;
        uint32_t index;
        uint64_t data;
    };

    struct kvm_run_system_event {
        uint32_t type;
        uint32_t ndata;
        uint64_t data[16];
    };

    struct kvm_run_fail_entry {
        uint64_t hardware_entry_failure_reason;
        uint32_t cpu;
    };

    struct kvm_run_ex {
        uint32_t exception;
        uint32_t error_code;
    };

    struct kvm_run_debug {
        uint32_t exception;
        uint32_t pad;
        uint64_t pc;
        uint64_t dr6;
        uint64_t dr7;
    };

    struct kvm_run_memory_fault {
        uint64_t flags;
        uint64_t gpa;
        uint64_t size;
    };

    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct kvm_run_io io;
            struct kvm_run_mmio mmio;
            struct kvm_run_internal internal;
            struct kvm_run_emulation_failure emulation_failure;
            struct kvm_run_msr msr;
            struct kvm_run_system_event system_event;
            struct kvm_run_fail_entry fail_entry;
            struct kvm_run_ex ex;
            struct kvm_run_debug debug;
            struct kvm_run_memory_fault memory_fault;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        char s[2048];
    };
    """
)

libc = ffi.dlopen(None)

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h) ---
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOW(nr: int, struct: str) -> int:
    return _IOC(_IOC_WRITE, nr, ffi.sizeof(struct))


def _IOR(nr: int, struct: str) -> int:
    return _IOC(_IOC_READ, nr, ffi.sizeof(struct))


def _IOWR(nr: int, struct: str) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(struct))


# system ioctls
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _IO(0x60)
KVM_IRQ_LINE = _IOW(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _IOWR(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _IOR(0x63, "struct kvm_irqchip")
KVM_SET_GSI_ROUTING = _IOW(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _IOW(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _IOW(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _IOW(0x79, "struct kvm_ioeventfd")
KVM_SIGNAL_MSI = _IOW(0xA5, "struct kvm_msi")
KVM_SET_CLOCK = _IOW(0x7B, "struct kvm_clock_data")
KVM_SET_DEVICE_ATTR = _IOW(0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR = _IOW(0xE2, "struct kvm_device_attr")
KVM_GET_CLOCK = _IOR(0x7C, "struct kvm_clock_data")
KVM_ENABLE_CAP = _IOW(0xA3, "struct kvm_enable_cap")
KVM_X86_SET_MSR_FILTER = _IOW(0xC6, "struct kvm_msr_filter")
# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, "struct kvm_regs")
KVM_SET_REGS = _IOW(0x82, "struct kvm_regs")
KVM_GET_SREGS = _IOR(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _IOW(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _IOWR(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _IOW(0x89, "struct kvm_msrs")
KVM_GET_FPU = _IOR(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _IOW(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _IOR(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _IOW(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _IOW(0x90, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _IOR(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _IOW(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _IOR(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _IOW(0xA0, "struct kvm_vcpu_events")
KVM_GET_XSAVE = _IOR(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _IOW(0xA5, "struct kvm_xsave")
KVM_SET_TSC_KHZ = _IO(0xA2)
KVM_GET_TSC_KHZ = _IO(0xA3)

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT2 = 33
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_HYPERV = 44
KVM_CAP_HYPERV_SYNIC = 123
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_ADJUST_CLOCK = 39

MSR_IA32_TSC = 0x10

# vCPU device attributes
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

# exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_MEMORY_FAULT = 39

EXIT_REASON_NAMES = {
    value: name[len("KVM_EXIT_"):].lower()
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# internal error sub-reasons
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# system events
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# ioeventfd flags
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# irqfd flags
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# irq routing
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

# vcpu events flags
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010

# KVM_CAP_X86_USER_SPACE_MSR reasons
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# MSR filter
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1

# mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

# KVM_GET_SUPPORTED_CPUID entry flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

KVM_PIT_SPEAKER_DUMMY = 1

# --- mmap / madvise (sys/mman.h) ---
PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_HUGETLB = 0x40000
MAP_FAILED = 0xFFFFFFFFFFFFFFFF
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
