/* Burns CPU in a known chain main -> outer -> middle -> leaf_burn until the
 * number of seconds given as argv[1] has passed. Waits for a byte on stdin
 * before starting so the test can attach first, and stays alive until stdin
 * closes. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long sink;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The local lives on the stack (volatile), so even gcc 12, which skips the
 * frame-pointer prologue in leaf functions without a stack frame despite
 * -fno-omit-frame-pointer, gives leaf_burn a frame. */
__attribute__((noinline)) void leaf_burn(void)
{
	volatile unsigned long x = sink;
	for (int i = 0; i < 20000000; i++)
		x = x * 6364136223846793005UL + 1442695040888963407UL;
	sink = x;
}

__attribute__((noinline)) void middle(void)
{
	leaf_burn();
	__asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void outer(void)
{
	middle();
	__asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 2.0;
	char go;
	if (read(0, &go, 1) != 1)
		return 1;
	double end = now() + secs;
	while (now() < end)
		outer();
	printf("done\n");
	fflush(stdout);
	/* Stay alive (maps readable for symbolization) until stdin closes. */
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
