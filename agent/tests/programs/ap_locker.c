/* Four threads contend on one mutex, each holding it ~2 ms, for argv[1] seconds. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static double until;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void hold_lock(void)
{
	pthread_mutex_lock(&mu);
	struct timespec d = { 0, 2000000 };
	nanosleep(&d, NULL);
	pthread_mutex_unlock(&mu);
}

static void *worker(void *arg)
{
	(void)arg;
	while (now() < until)
		hold_lock();
	return NULL;
}

int main(int argc, char **argv)
{
	until = now() + (argc > 1 ? atof(argv[1]) : 5.0);
	pthread_t t[4];
	for (int i = 0; i < 4; i++)
		pthread_create(&t[i], NULL, worker, NULL);
	for (int i = 0; i < 4; i++)
		pthread_join(t[i], NULL);
	return 0;
}
