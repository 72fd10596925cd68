/* mmap-fsync-race -- page-cache writeback race: one thread keeps writing the
 * pages of a shared file mapping while another calls fsync(2) and
 * sync_file_range(2), so that writeback sends pages the first thread is
 * changing (unless the filesystem has stable pages: stable_writes=1 on the
 * queue when it was mounted makes a write fault wait for writeback).
 *
 * The filesystem (ext4 on /dev/vda, /sys/block/vda/queue/stable_writes set
 * before mount) is set up by the caller; see guest-tests/run-scenarios.
 *
 *   mmap-fsync-race [--file /mnt/race] [--size 4M] [--seconds 10]
 *                   [--sync both|fsync|sfr] [--queue vda]
 *
 * At the end: stop both threads, fsync, then read the file back with O_DIRECT
 * (from the disk, through the backend's checksum verification) and compare
 * every page with the last value the writer put there.
 *
 * Prints one line:
 *   PINBLK-PROG name=mmap-fsync-race stable_writes=0|1 pages=N sweeps=..
 *     page_writes=.. fsyncs=.. sfrs=.. sync_eio=.. verify_pages=.. verify_bad=..
 *     read_eio=.. seconds=S status=0|1
 */
#include "common.h"

#include <getopt.h>
#include <pthread.h>

static unsigned char *map;
static unsigned char *last; /* last value written per page */
static size_t npages;
static volatile int stop;
static unsigned long sweeps, page_writes, fsyncs, sfrs, sync_eio, sync_err;
static int fd;
static int mode; /* 0 both, 1 fsync, 2 sync_file_range */

static void *writer(void *arg)
{
	(void)arg;
	unsigned char v = 1;
	while (!stop) {
		for (size_t p = 0; p < npages && !stop; p++) {
			memset(map + p * BLK, v, BLK);
			last[p] = v;
			page_writes++;
		}
		sweeps++;
		v = (unsigned char)(v % 250 + 1);
	}
	return NULL;
}

static void *syncer(void *arg)
{
	(void)arg;
	unsigned long n = 0;
	while (!stop) {
		int use_fsync = mode == 1 || (mode == 0 && (n & 1));
		int r;
		if (use_fsync) {
			r = fsync(fd);
			fsyncs++;
		} else {
			r = sync_file_range(fd, 0, 0,
					    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
						    SYNC_FILE_RANGE_WAIT_AFTER);
			sfrs++;
		}
		if (r < 0) {
			if (errno == EIO)
				sync_eio++;
			else
				sync_err++;
		}
		n++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	prog_name = "mmap-fsync-race";
	const char *file = "/mnt/race", *queue = "vda", *syncmode = "both";
	uint64_t size = 4ULL << 20;
	double seconds = 10;
	static const struct option opts[] = {
		{"file", required_argument, 0, 'f'},
		{"size", required_argument, 0, 'S'},
		{"seconds", required_argument, 0, 's'},
		{"sync", required_argument, 0, 'y'},
		{"queue", required_argument, 0, 'q'},
		{"help", no_argument, 0, 'h'},
		{0, 0, 0, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case 'f': file = optarg; break;
		case 'S': size = parse_size(optarg); break;
		case 's': seconds = strtod(optarg, NULL); break;
		case 'y': syncmode = optarg; break;
		case 'q': queue = optarg; break;
		default:
			fprintf(stderr, "usage: mmap-fsync-race [--file F] [--size B] [--seconds S] "
					"[--sync both|fsync|sfr] [--queue vda]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (!strcmp(syncmode, "both"))
		mode = 0;
	else if (!strcmp(syncmode, "fsync"))
		mode = 1;
	else if (!strcmp(syncmode, "sfr"))
		mode = 2;
	else
		die("bad --sync %s", syncmode);
	if (!size || size % BLK)
		die("size must be a non-zero multiple of 4 KiB");
	npages = size / BLK;

	int stable = -1;
	char path[256];
	snprintf(path, sizeof(path), "/sys/block/%s/queue/stable_writes", queue);
	FILE *sf = fopen(path, "r");
	if (sf) {
		if (fscanf(sf, "%d", &stable) != 1)
			stable = -1;
		fclose(sf);
	}

	fd = open(file, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die("open %s: %s", file, strerror(errno));
	if (ftruncate(fd, (off_t)size) < 0)
		die("ftruncate: %s", strerror(errno));
	map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED)
		die("mmap: %s", strerror(errno));
	last = calloc(npages, 1);
	/* allocate the blocks first, so that the race is about data pages */
	memset(map, 0, size);
	if (fsync(fd) < 0)
		die("fsync: %s", strerror(errno));

	double t0 = now_s();
	pthread_t tw, ts;
	if (pthread_create(&tw, NULL, writer, NULL) || pthread_create(&ts, NULL, syncer, NULL))
		die("pthread_create failed");
	while (now_s() - t0 < seconds)
		usleep(100000);
	stop = 1;
	pthread_join(tw, NULL);
	pthread_join(ts, NULL);
	int final_sync_eio = 0;
	if (msync(map, size, MS_SYNC) < 0 || fsync(fd) < 0) {
		if (errno == EIO)
			final_sync_eio = 1;
		else
			die("final fsync: %s", strerror(errno));
	}

	/* read back from the disk (O_DIRECT bypasses the page cache) */
	unsigned long verify_pages = 0, verify_bad = 0, read_eio = 0, read_err = 0;
	int dfd = open(file, O_RDONLY | O_DIRECT);
	if (dfd < 0)
		die("open O_DIRECT %s: %s", file, strerror(errno));
	unsigned char *p = alloc_aligned(BLK);
	for (size_t i = 0; i < npages; i++) {
		ssize_t n = pread(dfd, p, BLK, (off_t)(i * BLK));
		if (n != BLK) {
			if (n < 0 && errno == EIO)
				read_eio++;
			else
				read_err++;
			continue;
		}
		verify_pages++;
		for (unsigned j = 0; j < BLK; j++) {
			if (p[j] != last[i]) {
				verify_bad++;
				break;
			}
		}
	}
	close(dfd);
	munmap(map, size);
	close(fd);
	int status = (sync_err || read_err || verify_bad) ? 1 : 0;
	printf("PINBLK-PROG name=mmap-fsync-race stable_writes=%d pages=%zu sweeps=%lu "
	       "page_writes=%lu fsyncs=%lu sfrs=%lu sync_eio=%lu final_sync_eio=%d "
	       "verify_pages=%lu verify_bad=%lu read_eio=%lu seconds=%.1f status=%d\n",
	       stable, npages, sweeps, page_writes, fsyncs, sfrs, sync_eio, final_sync_eio,
	       verify_pages, verify_bad, read_eio, now_s() - t0, status);
	fflush(stdout);
	return status;
}
