/* THREADS threads contend one pthread mutex, each holding it for HOLD_US
 * per round, for ROUNDS rounds or the number given as the first argument.
 * Every thread measures the time it spends in pthread_mutex_lock; the total
 * (ns) is printed as "wait_ns <n>". Waits for a byte on stdin before
 * starting. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define THREADS 4
#define ROUNDS 100
#define HOLD_US 1000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long total_wait_ns;
static int rounds = ROUNDS;

static unsigned long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* The contended call site. */
__attribute__((noinline)) unsigned long long lock_site(void)
{
	unsigned long long t0 = now_ns();
	pthread_mutex_lock(&lock);
	unsigned long long waited = now_ns() - t0;
	__asm__ volatile("" ::: "memory");
	return waited;
}

__attribute__((noinline)) void *contend_worker(void *arg)
{
	(void)arg;
	unsigned long long mine = 0;
	for (int i = 0; i < rounds; i++) {
		mine += lock_site();
		struct timespec hold = { 0, HOLD_US * 1000 };
		nanosleep(&hold, NULL);
		pthread_mutex_unlock(&lock);
	}
	__atomic_fetch_add(&total_wait_ns, mine, __ATOMIC_RELAXED);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[THREADS];
	char go;
	if (argc > 1 && (rounds = atoi(argv[1])) <= 0)
		return 2;
	if (read(0, &go, 1) != 1)
		return 1;
	for (int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, contend_worker, NULL);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	printf("wait_ns %llu\n", total_wait_ns);
	fflush(stdout);
	/* Stay alive (maps readable for symbolization) until stdin closes. */
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
