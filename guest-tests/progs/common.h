/* guest-tests/progs/common.h -- shared helpers of the pinblk guest programs:
 * size parsing, aligned buffers, a tiny raw io_uring (no liburing: the
 * programs are linked statically from <linux/io_uring.h> alone).
 *
 * Every program prints exactly one machine-readable line
 *     PINBLK-PROG name=<prog> key=value ... status=<0|1>
 * on stdout and exits non-zero only on its own failures (bad usage, setup
 * failed, an I/O error it was told to treat as fatal).
 */
#ifndef PINBLK_PROGS_COMMON_H
#define PINBLK_PROGS_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096

static const char *prog_name = "prog";

static inline void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", prog_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	printf("PINBLK-PROG name=%s status=1 error=setup\n", prog_name);
	fflush(stdout);
	exit(1);
}

/* "64M", "4k", "1G", "12345" -> bytes */
static inline uint64_t parse_size(const char *s)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 0);
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	case '\0': break;
	default: die("bad size '%s'", s);
	}
	if (*end == 'i' || *end == 'I') end++;
	if (*end == 'b' || *end == 'B') end++;
	if (*end) die("bad size '%s'", s);
	return v;
}

static inline double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void *alloc_aligned(size_t len)
{
	void *p = NULL;
	if (posix_memalign(&p, BLK, len))
		die("posix_memalign(%zu) failed", len);
	memset(p, 0, len);
	return p;
}

/* xorshift64*: cheap per-thread random numbers */
static inline uint64_t rnd_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 2685821657736338717ULL;
}

/* busy-wait about `us` microseconds (no syscall: keeps the thread on its CPU) */
static inline void spin_us(unsigned us)
{
	if (!us)
		return;
	double end = now_s() + us / 1e6;
	while (now_s() < end)
		__asm__ volatile("pause" ::: "memory");
}

/* ---- raw io_uring ------------------------------------------------------ */

struct uring {
	int fd;
	unsigned sq_entries, cq_entries;
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
	unsigned *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
};

static inline int uring_setup(struct uring *u, unsigned entries)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (fd < 0)
		return -errno;
	size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	int single = p.features & IORING_FEAT_SINGLE_MMAP;
	if (single && cq_sz > sq_sz)
		sq_sz = cq_sz;
	char *sq = mmap(NULL, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
			IORING_OFF_SQ_RING);
	if (sq == MAP_FAILED)
		return -errno;
	char *cq = sq;
	if (!single) {
		cq = mmap(NULL, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
			  IORING_OFF_CQ_RING);
		if (cq == MAP_FAILED)
			return -errno;
	}
	u->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
	if (u->sqes == MAP_FAILED)
		return -errno;
	u->fd = fd;
	u->sq_entries = p.sq_entries;
	u->cq_entries = p.cq_entries;
	u->sq_head = (unsigned *)(sq + p.sq_off.head);
	u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	u->sq_array = (unsigned *)(sq + p.sq_off.array);
	u->cq_head = (unsigned *)(cq + p.cq_off.head);
	u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
	u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	return 0;
}

/* IORING_REGISTER_BUFFERS: the kernel pins these pages long-term (FOLL_LONGTERM) */
static inline int uring_register_buffers(struct uring *u, struct iovec *iov, unsigned n)
{
	if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_BUFFERS, iov, n) < 0)
		return -errno;
	return 0;
}

/* queue one SQE (caller checks there is room: at most sq_entries outstanding) */
static inline struct io_uring_sqe *uring_sqe(struct uring *u)
{
	unsigned tail = *u->sq_tail;
	unsigned idx = tail & *u->sq_mask;
	struct io_uring_sqe *sqe = &u->sqes[idx];
	memset(sqe, 0, sizeof(*sqe));
	u->sq_array[idx] = idx;
	__atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
	return sqe;
}

static inline void uring_prep_rw(struct io_uring_sqe *sqe, int op, int fd, void *buf, unsigned len,
			  uint64_t off, uint64_t user)
{
	sqe->opcode = (uint8_t)op;
	sqe->fd = fd;
	sqe->addr = (uint64_t)(uintptr_t)buf;
	sqe->len = len;
	sqe->off = off;
	sqe->user_data = user;
}

/* submit everything queued and wait for `wait` completions */
static inline int uring_enter(struct uring *u, unsigned submit, unsigned wait)
{
	for (;;) {
		int r = (int)syscall(__NR_io_uring_enter, u->fd, submit, wait,
				     wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
		if (r >= 0)
			return r;
		if (errno != EINTR)
			return -errno;
	}
}

/* pop one CQE if there is one: 1 with user and res filled, else 0 */
static inline int uring_cqe(struct uring *u, uint64_t *user, int *res)
{
	unsigned head = *u->cq_head;
	if (head == __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE))
		return 0;
	struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
	*user = c->user_data;
	*res = c->res;
	__atomic_store_n(u->cq_head, head + 1, __ATOMIC_RELEASE);
	return 1;
}

#endif
