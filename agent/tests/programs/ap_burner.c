/* Burns CPU in a known call chain (leaf_burn <- middle <- outer <- main)
 * for argv[1] seconds. */
#include <stdlib.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) unsigned long finish(unsigned long x) { return x ^ (x >> 7); }

/* Calls finish() so it is not a leaf function: it then keeps a frame
 * pointer and its caller shows in frame-pointer stacks. */
__attribute__((noinline)) unsigned long leaf_burn(unsigned long x)
{
	for (int i = 0; i < 100000; i++)
		x = x * 6364136223846793005UL + 1442695040888963407UL;
	return finish(x);
}

__attribute__((noinline)) unsigned long middle(unsigned long x) { return leaf_burn(x) ^ 1; }
__attribute__((noinline)) unsigned long outer(unsigned long x) { return middle(x) + 1; }

int main(int argc, char **argv)
{
	double until = now() + (argc > 1 ? atof(argv[1]) : 5.0);
	volatile unsigned long sink = 1;
	while (now() < until)
		sink = outer(sink);
	return (int)(sink & 0);
}
