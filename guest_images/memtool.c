/*
 * memtool: data-integrity and file-reading helper for the pyvmm guest agent.
 *
 *   memtool fill PATH SIZE SEED    write SIZE bytes of the seeded pattern
 *   memtool verify PATH SEED       recompute the pattern over the whole file
 *   memtool cat [-l] FILE...       print files; -l: each line as "FILE: line"
 *   memtool klog N                 the last N lines of the kernel log
 *
 * cat and klog exist because busybox sh's `read` makes one system call per
 * byte: reading /proc/meminfo that way costs more guest-kernel work than
 * one exec of this small program.
 *
 * The pattern is a pure function of (seed, byte offset), so a file can be
 * checked after its pages were migrated, offlined/onlined or hot-unplugged
 * elsewhere. PATH is meant to be on tmpfs: its pages then live in ordinary
 * (movable) guest memory and no process has to stay alive to hold them.
 *
 * Output is one line: "filled SIZE", "ok SIZE",
 * "mismatch OFFSET expected 0xEE got 0xGG", or "error: ...".
 * Exit status: 0 ok, 1 mismatch, 2 usage or I/O error.
 *
 * Built with `gcc -static -nostdlib -O2`: no libc, so the binary is a few
 * KiB instead of ~700 KiB of static glibc. That matters because unpacking
 * the initramfs and every exec are interpreted kernel work in a PVM guest
 * (about 2 s per MiB unpacked, about a second per exec). For the same
 * reason it uses large reads and writes (few system calls) into small buffers.
 */
#include <stddef.h>
#include <stdint.h>
#include <asm/unistd.h>		/* __NR_* */
#include <linux/fcntl.h>	/* O_* */
#include <linux/errno.h>	/* EINTR, ENOSPC */

enum { EXIT_OK = 0, EXIT_MISMATCH = 1, EXIT_ERROR = 2 };

/*
 * 64 KiB per read()/write(): few system calls, yet few buffer pages to
 * fault in (each guest page fault is interpreted kernel work too).
 */
#define CHUNK_BYTES (64u << 10)
#define WORD_BYTES 8u
#define STDOUT_FD 1
#define FILE_MODE 0600

static unsigned char chunk[CHUNK_BYTES];
static unsigned char want[CHUNK_BYTES];

/* ---- the few system calls needed, without libc (x86-64 ABI) ---- */

static long sys3(long nr, long a, long b, long c)
{
	long ret;

	__asm__ volatile ("syscall"
			  : "=a" (ret)
			  : "a" (nr), "D" (a), "S" (b), "d" (c)
			  : "rcx", "r11", "memory");
	return ret;	/* -errno on failure */
}

static long sys_read(int fd, void *buf, size_t len)
{
	return sys3(__NR_read, fd, (long)buf, (long)len);
}

static long sys_write(int fd, const void *buf, size_t len)
{
	return sys3(__NR_write, fd, (long)buf, (long)len);
}

static long sys_open(const char *path, int flags, int mode)
{
	return sys3(__NR_open, (long)path, flags, mode);
}

static long sys_close(int fd)
{
	return sys3(__NR_close, fd, 0, 0);
}

static long sys_syslog(int type, char *buf, int len)
{
	return sys3(__NR_syslog, type, (long)buf, len);
}

static __attribute__((noreturn)) void sys_exit(int status)
{
	for (;;)
		sys3(__NR_exit_group, status, 0, 0);
}

/* gcc may emit calls to these for struct copies and loops */
void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* ---- one output line, assembled in a small buffer ---- */

static char line[256];
static size_t line_len;

static void put_str(const char *s)
{
	while (*s && line_len < sizeof(line) - 1)
		line[line_len++] = *s++;
}

static void put_u64(uint64_t v)
{
	char digits[21];
	int n = 0;

	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && line_len < sizeof(line) - 1)
		line[line_len++] = digits[--n];
}

static void put_hex8(unsigned int v)
{
	static const char hex[] = "0123456789abcdef";
	char s[5] = { '0', 'x', hex[(v >> 4) & 15], hex[v & 15], 0 };

	put_str(s);
}

static void flush_line(void)
{
	line[line_len++] = '\n';
	sys_write(STDOUT_FD, line, line_len);
	line_len = 0;
}

static int fail(const char *what, const char *path, long err)
{
	put_str("error: ");
	put_str(what);
	put_str(" ");
	put_str(path);
	put_str(": errno ");
	put_u64((uint64_t)-err);
	flush_line();
	return EXIT_ERROR;
}

/* ---- the pattern ---- */

/* splitmix64 finaliser: every 8-byte word depends on (seed, word index). */
static uint64_t pattern_word(uint64_t seed, uint64_t word_index)
{
	uint64_t z = seed + (word_index + 1) * 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Fill buf with the pattern bytes for file offsets [offset, offset+len). */
static void pattern_bytes(uint64_t seed, uint64_t offset, unsigned char *buf,
			  size_t len)
{
	size_t i = 0;

	while (i < len) {
		uint64_t pos = offset + i;
		uint64_t word = pattern_word(seed, pos / WORD_BYTES);
		unsigned int byte = pos % WORD_BYTES;

		/* little-endian byte order, independent of chunk alignment */
		for (; byte < WORD_BYTES && i < len; byte++, i++)
			buf[i] = (unsigned char)(word >> (8 * byte));
	}
}

/* Decimal or 0x-hex; with allow_suffix also K/M/G (binary units). */
static int parse_u64(const char *s, uint64_t *out, int allow_suffix)
{
	uint64_t v = 0;
	unsigned int base = 10, shift = 0;
	int digits = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (; *s; s++, digits++) {
		unsigned int d;

		if (*s >= '0' && *s <= '9')
			d = (unsigned int)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned int)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned int)(*s - 'A' + 10);
		else
			break;
		if (v > (UINT64_MAX - d) / base)
			return -1;
		v = v * base + d;
	}
	if (!digits)
		return -1;
	if (allow_suffix && *s) {
		switch (*s++) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		default: return -1;
		}
		if (v > (UINT64_MAX >> shift))
			return -1;
	}
	if (*s)
		return -1;
	*out = v << shift;
	return 0;
}

static long write_all(int fd, const unsigned char *buf, size_t len)
{
	while (len) {
		long n = sys_write(fd, buf, len);

		if (n == -EINTR)
			continue;
		if (n < 0)
			return n;
		if (n == 0)
			return -ENOSPC;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int do_fill(const char *path, uint64_t size, uint64_t seed)
{
	uint64_t off = 0;
	long fd = sys_open(path, O_WRONLY | O_CREAT | O_TRUNC, FILE_MODE);
	long err;

	if (fd < 0)
		return fail("open", path, fd);
	while (off < size) {
		size_t len = size - off < CHUNK_BYTES ? (size_t)(size - off) : CHUNK_BYTES;

		pattern_bytes(seed, off, chunk, len);
		err = write_all((int)fd, chunk, len);
		if (err < 0) {
			sys_close((int)fd);
			return fail("write", path, err);
		}
		off += len;
	}
	err = sys_close((int)fd);
	if (err < 0)
		return fail("close", path, err);
	put_str("filled ");
	put_u64(size);
	flush_line();
	return EXIT_OK;
}

static int do_verify(const char *path, uint64_t seed)
{
	uint64_t off = 0;
	long fd = sys_open(path, O_RDONLY, 0);

	if (fd < 0)
		return fail("open", path, fd);
	for (;;) {
		long n = sys_read((int)fd, chunk, CHUNK_BYTES);
		size_t i;

		if (n == -EINTR)
			continue;
		if (n < 0) {
			sys_close((int)fd);
			return fail("read", path, n);
		}
		if (n == 0)
			break;
		pattern_bytes(seed, off, want, (size_t)n);
		for (i = 0; i < (size_t)n; i++) {
			if (chunk[i] != want[i]) {
				put_str("mismatch ");
				put_u64(off + i);
				put_str(" expected ");
				put_hex8(want[i]);
				put_str(" got ");
				put_hex8(chunk[i]);
				flush_line();
				sys_close((int)fd);
				return EXIT_MISMATCH;
			}
		}
		off += (uint64_t)n;
	}
	sys_close((int)fd);
	put_str("ok ");
	put_u64(off);
	flush_line();
	return EXIT_OK;
}

/* ---- cat and klog ---- */

static long write_out(const void *buf, size_t len)
{
	return write_all(STDOUT_FD, buf, len);
}

/* One file; with label, every line (and an unterminated last one) is
 * printed as "path: line". Returns 0, or -errno. */
static long cat_file(const char *path, int label)
{
	long fd = sys_open(path, O_RDONLY, 0);
	int at_line_start = 1;
	size_t path_len = 0;

	if (fd < 0)
		return fd;
	while (path[path_len])
		path_len++;
	for (;;) {
		long n = sys_read((int)fd, chunk, CHUNK_BYTES);
		long i, start = 0;

		if (n == -EINTR)
			continue;
		if (n <= 0) {
			sys_close((int)fd);
			if (label && !at_line_start)
				write_out("\n", 1);
			return n;
		}
		if (!label) {
			write_out(chunk, (size_t)n);
			continue;
		}
		for (i = 0; i < n; i++) {
			if (at_line_start) {
				write_out(chunk + start, (size_t)(i - start));
				write_out(path, path_len);
				write_out(": ", 2);
				start = i;
				at_line_start = 0;
			}
			if (chunk[i] == '\n')
				at_line_start = 1;
		}
		write_out(chunk + start, (size_t)(n - start));
	}
}

static int do_cat(int argc, char **argv)
{
	int label = 0, status = EXIT_OK, i = 2;

	if (i < argc && str_eq(argv[i], "-l")) {
		label = 1;
		i++;
	}
	for (; i < argc; i++) {
		long err = cat_file(argv[i], label);

		if (err < 0)
			status = fail("read", argv[i], err);
	}
	return status;
}

enum { SYSLOG_ACTION_READ_ALL = 3, SYSLOG_ACTION_SIZE_BUFFER = 10 };
#define KLOG_BUF_BYTES (1u << 20)
static char klog_buf[KLOG_BUF_BYTES];

static int do_klog(uint64_t lines)
{
	long size = sys_syslog(SYSLOG_ACTION_SIZE_BUFFER, 0, 0);
	long n, start;

	if (size < 0)
		return fail("syslog", "size", size);
	if (size > (long)KLOG_BUF_BYTES)
		size = KLOG_BUF_BYTES;
	n = sys_syslog(SYSLOG_ACTION_READ_ALL, klog_buf, (int)size);
	if (n < 0)
		return fail("syslog", "read", n);
	/* Walk back over `lines` newlines (not counting a final one). */
	start = n;
	if (start > 0 && klog_buf[start - 1] == '\n')
		start--;
	while (start > 0) {
		if (klog_buf[start - 1] == '\n' && lines-- <= 1)
			break;
		start--;
	}
	/* Drop each line's "<level>" prefix, as dmesg does. */
	while (start < n) {
		long end = start, text = start;

		while (end < n && klog_buf[end] != '\n')
			end++;
		if (klog_buf[text] == '<') {
			long p = text + 1;

			while (p < end && klog_buf[p] >= '0' && klog_buf[p] <= '9')
				p++;
			if (p < end && klog_buf[p] == '>')
				text = p + 1;
		}
		write_out(klog_buf + text, (size_t)(end - text));
		write_out("\n", 1);
		start = end + 1;
	}
	return EXIT_OK;
}

static int usage(void)
{
	put_str("error: usage: memtool fill PATH SIZE[K|M|G] SEED | verify PATH SEED"
		" | cat [-l] FILE... | klog LINES");
	flush_line();
	return EXIT_ERROR;
}

static int memtool_main(int argc, char **argv)
{
	uint64_t size, seed;

	if (argc == 5 && str_eq(argv[1], "fill")) {
		if (parse_u64(argv[3], &size, 1) || parse_u64(argv[4], &seed, 0))
			return usage();
		return do_fill(argv[2], size, seed);
	}
	if (argc == 4 && str_eq(argv[1], "verify")) {
		if (parse_u64(argv[3], &seed, 0))
			return usage();
		return do_verify(argv[2], seed);
	}
	if (argc >= 3 && str_eq(argv[1], "cat"))
		return do_cat(argc, argv);
	if (argc == 3 && str_eq(argv[1], "klog")) {
		if (parse_u64(argv[2], &size, 0) || size == 0)
			return usage();
		return do_klog(size);
	}
	return usage();
}

/* Called from _start with the initial stack pointer: argc, then argv[]. */
__attribute__((used)) void memtool_start(long *sp)
{
	sys_exit(memtool_main((int)sp[0], (char **)(sp + 1)));
}

/* The kernel enters with RSP pointing at argc; keep the ABI's 16-byte alignment. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call memtool_start\n"
	"	hlt\n");
