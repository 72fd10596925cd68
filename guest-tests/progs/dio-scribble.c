/* dio-scribble -- a direct-I/O "buffer changed under DMA" reproducer, in the
 * manner of xfstests generic/761 (src/dio-writeback-race.c).
 *
 * For each 4 KiB block of a region: fill a 4 KiB aligned buffer with 0xff,
 * then one thread writes it with O_DIRECT while another memsets it to 0x00
 * at the same time.  What reaches the disk is 0xff, 0x00 or a mix; the
 * backend's checksum of the write may not match either (a torn write).
 *
 *   dio-scribble [--dev /dev/vda] [--offset 64M] [--blocks 256]
 *                [--iterations 1] [--uring-fixed] [--delay-us 0]
 *                [--readback] [--eio-fatal] [--seed N]
 *
 *   --uring-fixed  write with io_uring IORING_OP_WRITE_FIXED from a buffer
 *                  registered with IORING_REGISTER_BUFFERS (the guest kernel
 *                  pins it long-term, FOLL_LONGTERM); default pwrite(2)
 *   --delay-us D|auto  the scribbling thread waits a random 0..D us (busy)
 *                  before its memset, spreading it over the write's flight
 *                  time; `auto` (default): D = the running average latency
 *                  of the writes (so the memset lands anywhere in a write's
 *                  flight, whatever the speed of the guest and the host);
 *                  0 = memset at once, as generic/761 does
 *   --readback     after the writes (and an fsync), read every block back
 *                  with O_DIRECT into its own buffer (io_uring, 32 in
 *                  flight) and classify it:
 *                  all 0xff, all 0x00, or mixed; EIO is counted
 *   --eio-fatal    an EIO from a write is a failure (default: counted only)
 *
 * Prints one line:
 *   PINBLK-PROG name=dio-scribble mode=pwrite|uring-fixed offset=B blocks=N
 *     iterations=I writes=W write_eio=E write_err=X rb_blocks=.. rb_ff=..
 *     rb_zero=.. rb_mixed=.. read_eio=.. read_err=.. seconds=S status=0|1
 */
#include "common.h"

#include <getopt.h>
#include <pthread.h>

static unsigned char *buf;
static pthread_barrier_t bar_start, bar_end;
static volatile int stop;
static volatile unsigned delay_us;
static int delay_auto = 1;
static uint64_t seed = 0x9e3779b97f4a7c15ULL;

static void *scribbler(void *arg)
{
	(void)arg;
	uint64_t s = seed ^ 0x5555;
	for (;;) {
		pthread_barrier_wait(&bar_start);
		if (stop)
			break;
		if (delay_us)
			spin_us((unsigned)(rnd_next(&s) % (delay_us + 1)));
		memset(buf, 0x00, BLK);
		pthread_barrier_wait(&bar_end);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	prog_name = "dio-scribble";
	const char *dev = "/dev/vda";
	uint64_t offset = 64ULL << 20;
	unsigned blocks = 256, iterations = 1;
	int uring_fixed = 0, readback = 0, eio_fatal = 0;
	static const struct option opts[] = {
		{"dev", required_argument, 0, 'd'},
		{"offset", required_argument, 0, 'o'},
		{"blocks", required_argument, 0, 'b'},
		{"iterations", required_argument, 0, 'i'},
		{"uring-fixed", no_argument, 0, 'u'},
		{"delay-us", required_argument, 0, 'D'},
		{"readback", no_argument, 0, 'r'},
		{"eio-fatal", no_argument, 0, 'e'},
		{"seed", required_argument, 0, 's'},
		{"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'd': dev = optarg; break;
		case 'o': offset = parse_size(optarg); break;
		case 'b': blocks = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'i': iterations = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'u': uring_fixed = 1; break;
		case 'D':
			delay_auto = !strcmp(optarg, "auto");
			delay_us = delay_auto ? 0 : (unsigned)strtoul(optarg, NULL, 0);
			break;
		case 'r': readback = 1; break;
		case 'e': eio_fatal = 1; break;
		case 's': seed = strtoull(optarg, NULL, 0) | 1; break;
		default:
			fprintf(stderr, "usage: dio-scribble [--dev D] [--offset B] [--blocks N] "
					"[--iterations I] [--uring-fixed] [--delay-us D] [--readback] "
					"[--eio-fatal] [--seed N]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (offset % BLK || !blocks)
		die("offset must be 4 KiB aligned and blocks > 0");

	int fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		die("open %s: %s", dev, strerror(errno));
	buf = alloc_aligned(BLK);

	struct uring u;
	memset(&u, 0, sizeof(u));
	if (uring_fixed) {
		int r = uring_setup(&u, 4);
		if (r < 0)
			die("io_uring_setup: %s", strerror(-r));
		struct iovec iov = {buf, BLK};
		r = uring_register_buffers(&u, &iov, 1);
		if (r < 0)
			die("IORING_REGISTER_BUFFERS: %s", strerror(-r));
	}

	pthread_barrier_init(&bar_start, NULL, 2);
	pthread_barrier_init(&bar_end, NULL, 2);
	pthread_t th;
	if (pthread_create(&th, NULL, scribbler, NULL))
		die("pthread_create failed");

	double t0 = now_s();
	double lat_avg_us = 200; /* running average write latency (auto delay) */
	if (delay_auto)
		delay_us = (unsigned)lat_avg_us;
	unsigned writes = 0, write_eio = 0, write_err = 0;
	for (unsigned it = 0; it < iterations; it++) {
		for (unsigned b = 0; b < blocks; b++) {
			uint64_t off = offset + (uint64_t)b * BLK;
			memset(buf, 0xff, BLK);
			pthread_barrier_wait(&bar_start);
			double tw = now_s();
			int res;
			if (uring_fixed) {
				struct io_uring_sqe *sqe = uring_sqe(&u);
				uring_prep_rw(sqe, IORING_OP_WRITE_FIXED, fd, buf, BLK, off, b);
				sqe->buf_index = 0;
				int r = uring_enter(&u, 1, 1);
				uint64_t user;
				if (r < 0)
					res = r;
				else if (!uring_cqe(&u, &user, &res))
					res = -EAGAIN;
			} else {
				ssize_t n = pwrite(fd, buf, BLK, (off_t)off);
				res = n < 0 ? -errno : (int)n;
			}
			double lat = (now_s() - tw) * 1e6;
			pthread_barrier_wait(&bar_end);
			lat_avg_us = lat_avg_us * 0.9 + lat * 0.1;
			if (delay_auto)
				delay_us = (unsigned)lat_avg_us;
			writes++;
			if (res == BLK)
				continue;
			if (res == -EIO) {
				write_eio++;
			} else {
				write_err++;
				if (write_err <= 5)
					fprintf(stderr, "dio-scribble: write at %llu: %s\n",
						(unsigned long long)off,
						res < 0 ? strerror(-res) : "short write");
			}
		}
	}
	stop = 1;
	pthread_barrier_wait(&bar_start);
	pthread_join(th, NULL);
	if (fsync(fd) < 0)
		fprintf(stderr, "dio-scribble: fsync: %s\n", strerror(errno));

	unsigned rb_blocks = 0, rb_ff = 0, rb_zero = 0, rb_mixed = 0, read_eio = 0, read_err = 0;
	if (readback) {
		enum { QD = 32 };
		unsigned char *rb = alloc_aligned((size_t)QD * BLK);
		struct uring r;
		memset(&r, 0, sizeof(r));
		int e = uring_setup(&r, QD);
		if (e < 0)
			die("io_uring_setup: %s", strerror(-e));
		unsigned next = 0, inflight = 0, slot_free[QD], nfree = QD;
		for (unsigned i = 0; i < QD; i++)
			slot_free[i] = i;
		while (next < blocks || inflight) {
			unsigned queued = 0;
			while (next < blocks && nfree) {
				unsigned sl = slot_free[--nfree];
				uring_prep_rw(uring_sqe(&r), IORING_OP_READ, fd, rb + (size_t)sl * BLK, BLK,
					      offset + (uint64_t)next * BLK, sl);
				next++;
				queued++;
			}
			int x = uring_enter(&r, queued, 1);
			if (x < 0)
				die("io_uring_enter: %s", strerror(-x));
			inflight += queued;
			uint64_t user;
			int res;
			while (uring_cqe(&r, &user, &res)) {
				inflight--;
				unsigned char *p = rb + (size_t)user * BLK;
				slot_free[nfree++] = (unsigned)user;
				if (res != BLK) {
					if (res == -EIO)
						read_eio++;
					else
						read_err++;
					continue;
				}
				rb_blocks++;
				unsigned ff = 0, zero = 0;
				for (unsigned i = 0; i < BLK; i++) {
					ff += p[i] == 0xff;
					zero += p[i] == 0x00;
				}
				if (ff == BLK)
					rb_ff++;
				else if (zero == BLK)
					rb_zero++;
				else
					rb_mixed++;
			}
		}
	}
	int status = (write_err || read_err || (eio_fatal && (write_eio || read_eio))) ? 1 : 0;
	printf("PINBLK-PROG name=dio-scribble mode=%s offset=%llu blocks=%u iterations=%u "
	       "writes=%u write_eio=%u write_err=%u rb_blocks=%u rb_ff=%u rb_zero=%u "
	       "rb_mixed=%u read_eio=%u read_err=%u delay_us=%s%u lat_us=%.0f seconds=%.1f status=%d\n",
	       uring_fixed ? "uring-fixed" : "pwrite", (unsigned long long)offset, blocks,
	       iterations, writes, write_eio, write_err, rb_blocks, rb_ff, rb_zero, rb_mixed,
	       read_eio, read_err, delay_auto ? "auto:" : "", delay_us, lat_avg_us, now_s() - t0,
	       status);
	fflush(stdout);
	return status;
}
