/* Makes slow system calls (20 ms nanosleep) from a known function, and
 * many fast ones, for argv[1] seconds. */
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void slow_call_site(void)
{
	struct timespec d = { 0, 20000000 };
	nanosleep(&d, NULL);
}

int main(int argc, char **argv)
{
	double until = now() + (argc > 1 ? atof(argv[1]) : 5.0);
	while (now() < until) {
		slow_call_site();
		for (int i = 0; i < 100; i++)
			(void)getppid();
	}
	return 0;
}
