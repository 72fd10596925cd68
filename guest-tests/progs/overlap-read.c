/* overlap-read -- O_DIRECT reads of several blocks into ONE buffer while an
 * O_DIRECT write from that same buffer is in flight (DESIGN.md R1/R2).
 *
 * Each round puts K reads (different blocks, all into the same 4 KiB
 * buffer) and one write (from that buffer, to another block) in flight
 * together: with io_uring, all K+1 in one io_uring_enter (default), or with
 * two threads (K preads / one pwrite, released by a barrier).  The backend
 * sees a WRITE whose source pages an in-flight READ is filling (R1), or a
 * READ into pages an in-flight WRITE is sending (R2), and several READs
 * landing in one buffer (R4's recheck case).
 *
 *   overlap-read [--dev /dev/vda] [--offset 128M] [--blocks 64] [--rounds 200]
 *                [--nreads 4] [--threads] [--write-first] [--no-init]
 *                [--verify] [--eio-fatal]
 *
 *   The region is --blocks 4 KiB blocks at --offset: reads come from the
 *   first half (every other block), writes go to the second half.
 *   --no-init      don't write a pattern over the region first
 *   --write-first  queue the write before the reads (default: reads first)
 *   --verify       at the end, read every block of the region back, each into
 *                  its own buffer (a clean pass: no overlap)
 *
 * Prints one line:
 *   PINBLK-PROG name=overlap-read mode=uring|threads rounds=R reads=.. writes=..
 *     read_eio=.. write_eio=.. read_err=.. write_err=.. init_eio=..
 *     verify_blocks=.. verify_eio=.. seconds=S status=0|1
 */
#include "common.h"

#include <getopt.h>
#include <pthread.h>

static int fd;
static unsigned char *buf;
static uint64_t offset = 128ULL << 20;
static unsigned blocks = 64, nreads = 4;
static pthread_barrier_t bar_start, bar_end;
static volatile int stop;
static volatile unsigned round_no;
static unsigned t_reads, t_read_eio, t_read_err;

static uint64_t read_block(unsigned round, unsigned i)
{
	unsigned half = blocks / 2, slots = (half + 1) / 2;
	return ((round * nreads + i) % slots) * 2;
}

static uint64_t write_block(unsigned round)
{
	unsigned half = blocks / 2;
	return half + round % (blocks - half);
}

static void count(int res, unsigned *ok, unsigned *eio, unsigned *err, const char *what)
{
	(*ok)++;
	if (res == BLK)
		return;
	if (res == -EIO) {
		(*eio)++;
	} else {
		(*err)++;
		if (*err <= 5)
			fprintf(stderr, "overlap-read: %s: %s\n", what,
				res < 0 ? strerror(-res) : "short transfer");
	}
}

static void *reader(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_barrier_wait(&bar_start);
		if (stop)
			break;
		for (unsigned i = 0; i < nreads; i++) {
			uint64_t b = read_block(round_no, i);
			ssize_t n = pread(fd, buf, BLK, (off_t)(offset + b * BLK));
			count(n < 0 ? -errno : (int)n, &t_reads, &t_read_eio, &t_read_err, "read");
		}
		pthread_barrier_wait(&bar_end);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	prog_name = "overlap-read";
	const char *dev = "/dev/vda";
	unsigned rounds = 200;
	int threads = 0, write_first = 0, init = 1, verify = 0, eio_fatal = 0;
	static const struct option opts[] = {
		{"dev", required_argument, 0, 'd'},
		{"offset", required_argument, 0, 'o'},
		{"blocks", required_argument, 0, 'b'},
		{"rounds", required_argument, 0, 'R'},
		{"nreads", required_argument, 0, 'n'},
		{"threads", no_argument, 0, 't'},
		{"write-first", no_argument, 0, 'w'},
		{"no-init", no_argument, 0, 'N'},
		{"verify", no_argument, 0, 'v'},
		{"eio-fatal", no_argument, 0, 'e'},
		{"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'd': dev = optarg; break;
		case 'o': offset = parse_size(optarg); break;
		case 'b': blocks = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'R': rounds = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'n': nreads = (unsigned)strtoul(optarg, NULL, 0); break;
		case 't': threads = 1; break;
		case 'w': write_first = 1; break;
		case 'N': init = 0; break;
		case 'v': verify = 1; break;
		case 'e': eio_fatal = 1; break;
		default:
			fprintf(stderr, "usage: overlap-read [--dev D] [--offset B] [--blocks N] "
					"[--rounds R] [--nreads K] [--threads] [--write-first] "
					"[--no-init] [--verify] [--eio-fatal]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (offset % BLK || blocks < 4 || !nreads || nreads > 32)
		die("need a 4 KiB aligned offset, blocks >= 4, 1 <= nreads <= 32");

	fd = open(dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		die("open %s: %s", dev, strerror(errno));
	buf = alloc_aligned(BLK);
	double t0 = now_s();

	unsigned init_eio = 0, init_err = 0;
	if (init) {
		unsigned char *p = alloc_aligned(BLK);
		for (unsigned b = 0; b < blocks; b++) {
			memset(p, 0x10 + (b & 0x7f), BLK);
			ssize_t n = pwrite(fd, p, BLK, (off_t)(offset + (uint64_t)b * BLK));
			if (n != BLK) {
				if (n < 0 && errno == EIO)
					init_eio++;
				else
					init_err++;
			}
		}
		if (fsync(fd) < 0)
			fprintf(stderr, "overlap-read: fsync: %s\n", strerror(errno));
		free(p);
	}

	unsigned reads = 0, writes = 0, read_eio = 0, write_eio = 0, read_err = 0, write_err = 0;
	if (threads) {
		pthread_barrier_init(&bar_start, NULL, 2);
		pthread_barrier_init(&bar_end, NULL, 2);
		pthread_t th;
		if (pthread_create(&th, NULL, reader, NULL))
			die("pthread_create failed");
		for (unsigned r = 0; r < rounds; r++) {
			round_no = r;
			pthread_barrier_wait(&bar_start);
			ssize_t n = pwrite(fd, buf, BLK, (off_t)(offset + write_block(r) * BLK));
			count(n < 0 ? -errno : (int)n, &writes, &write_eio, &write_err, "write");
			pthread_barrier_wait(&bar_end);
		}
		stop = 1;
		pthread_barrier_wait(&bar_start);
		pthread_join(th, NULL);
		reads = t_reads;
		read_eio = t_read_eio;
		read_err = t_read_err;
	} else {
		struct uring u;
		memset(&u, 0, sizeof(u));
		int r = uring_setup(&u, 64);
		if (r < 0)
			die("io_uring_setup: %s", strerror(-r));
		for (unsigned rd = 0; rd < rounds; rd++) {
			if (write_first)
				uring_prep_rw(uring_sqe(&u), IORING_OP_WRITE, fd, buf, BLK,
					      offset + write_block(rd) * BLK, 1000);
			for (unsigned i = 0; i < nreads; i++)
				uring_prep_rw(uring_sqe(&u), IORING_OP_READ, fd, buf, BLK,
					      offset + read_block(rd, i) * BLK, i);
			if (!write_first)
				uring_prep_rw(uring_sqe(&u), IORING_OP_WRITE, fd, buf, BLK,
					      offset + write_block(rd) * BLK, 1000);
			unsigned want = nreads + 1, got = 0;
			int submitted = uring_enter(&u, want, want);
			if (submitted < 0)
				die("io_uring_enter: %s", strerror(-submitted));
			while (got < want) {
				uint64_t user;
				int res;
				if (!uring_cqe(&u, &user, &res)) {
					int e = uring_enter(&u, 0, 1);
					if (e < 0)
						die("io_uring_enter(wait): %s", strerror(-e));
					continue;
				}
				got++;
				if (user == 1000)
					count(res, &writes, &write_eio, &write_err, "write");
				else
					count(res, &reads, &read_eio, &read_err, "read");
			}
		}
	}
	if (fsync(fd) < 0)
		fprintf(stderr, "overlap-read: fsync: %s\n", strerror(errno));

	unsigned verify_blocks = 0, verify_eio = 0, verify_err = 0;
	if (verify) {
		unsigned char *p = alloc_aligned(BLK);
		for (unsigned b = 0; b < blocks; b++) {
			ssize_t n = pread(fd, p, BLK, (off_t)(offset + (uint64_t)b * BLK));
			if (n == BLK)
				verify_blocks++;
			else if (n < 0 && errno == EIO)
				verify_eio++;
			else
				verify_err++;
		}
	}
	int status = (read_err || write_err || init_err || verify_err ||
		      (eio_fatal && (read_eio || write_eio || init_eio || verify_eio)))
			     ? 1
			     : 0;
	printf("PINBLK-PROG name=overlap-read mode=%s offset=%llu blocks=%u rounds=%u nreads=%u "
	       "reads=%u writes=%u read_eio=%u write_eio=%u read_err=%u write_err=%u "
	       "init_eio=%u verify_blocks=%u verify_eio=%u seconds=%.1f status=%d\n",
	       threads ? "threads" : "uring", (unsigned long long)offset, blocks, rounds, nreads,
	       reads, writes, read_eio, write_eio, read_err, write_err, init_eio, verify_blocks,
	       verify_eio, now_s() - t0, status);
	fflush(stdout);
	return status;
}
