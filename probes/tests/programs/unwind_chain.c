/* Burns CPU in main -> outer -> middle -> leaf_burn (or, with argv[2] =
 * "lib", main -> outer -> lib_middle -> lib_leaf in libunwind_lib.so) for
 * argv[1] seconds. Built by the unwinding tests without frame pointers, and
 * with them but with a frameless leaf, so only .eh_frame recovers the
 * chain. With argv[2] = "deep", recurses argv[3] (default 300) levels
 * first (300: a stack deeper than any record). With argv[2] = "vdso", reads the clock in a loop from
 * vdso_site (the time goes to the vDSO). Waits for a byte on stdin before
 * starting and stays alive until stdin closes. With argv[2] = "exec", execs
 * itself (argv[1] kept) after the first go byte. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile unsigned long sink;

#ifdef WITH_LIB
void lib_middle(unsigned long n);
#endif

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* No stack frame: the loop lives in registers. */
__attribute__((noinline)) void leaf_burn(unsigned long n)
{
	unsigned long x = sink;
	for (unsigned long i = 0; i < n; i++)
		x = x * 6364136223846793005UL + 1442695040888963407UL;
	sink = x;
}

/* The empty asm after each call keeps the call from becoming a jump (a
 * tail call leaves no frame to find). */
__attribute__((noinline)) void middle(unsigned long n)
{
	leaf_burn(n);
	__asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void outer(int lib, unsigned long n)
{
#ifdef WITH_LIB
	if (lib)
		lib_middle(n);
	else
#endif
		middle(n);
	(void)lib;
	__asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void deep(int depth, double end)
{
	if (depth > 0)
		deep(depth - 1, end);
	else
		while (now() < end)
			middle(2000000);
	__asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void vdso_site(void)
{
	struct timespec ts;
	for (int i = 0; i < 1000; i++)
		clock_gettime(CLOCK_MONOTONIC, &ts);
	sink += ts.tv_nsec;
}

int main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 2.0;
	const char *what = argc > 2 ? argv[2] : "";
	char go;
	if (read(0, &go, 1) != 1)
		return 1;
	if (strcmp(what, "exec") == 0) {
		/* The new image waits for its own go byte. */
		char *args[] = { argv[0], argv[1], NULL };
		execv(argv[0], args);
		return 1;
	}
	double end = now() + secs;
	if (strcmp(what, "deep") == 0)
		deep(argc > 3 ? atoi(argv[3]) : 300, end);
	else if (strcmp(what, "vdso") == 0)
		while (now() < end)
			vdso_site();
	else
		while (now() < end)
			outer(strcmp(what, "lib") == 0, 20000000);
	printf("done\n");
	fflush(stdout);
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
