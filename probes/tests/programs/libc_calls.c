/* Reaches the kernel through glibc: THREADS threads contend one mutex in
 * lock_site (pthread_mutex_lock), then one 30 ms nanosleep from
 * sleep_site. Built without frame pointers; glibc has none either, so only
 * .eh_frame finds lock_site and sleep_site. Prints "done" after both.
 * Waits for a byte on stdin before starting. */
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define THREADS 4
#define ROUNDS 50
#define HOLD_US 1000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((noinline)) void lock_site(void)
{
	pthread_mutex_lock(&lock);
	__asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void *contend_worker(void *arg)
{
	(void)arg;
	for (int i = 0; i < ROUNDS; i++) {
		lock_site();
		struct timespec hold = { 0, HOLD_US * 1000 };
		nanosleep(&hold, NULL);
		pthread_mutex_unlock(&lock);
	}
	return NULL;
}

__attribute__((noinline)) void sleep_site(void)
{
	struct timespec ts = { 0, 30 * 1000 * 1000 };
	nanosleep(&ts, NULL);
	__asm__ volatile("" ::: "memory");
}

int main(void)
{
	pthread_t t[THREADS];
	char go;
	if (read(0, &go, 1) != 1)
		return 1;
	for (int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, contend_worker, NULL);
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	sleep_site();
	printf("done\n");
	fflush(stdout);
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
