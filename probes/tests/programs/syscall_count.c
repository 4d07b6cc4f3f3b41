/* Makes exactly argv[1] getppid calls, then one 20 ms nanosleep, both with
 * the syscall instruction itself (no libc wrapper, so no hidden extra call
 * and frame-pointer stacks that start in this file). Waits for a byte on
 * stdin before starting. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long raw_syscall2(long nr, long a, long b)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
	return ret;
}

__attribute__((noinline)) long count_site(long n)
{
	long sum = 0;
	for (long i = 0; i < n; i++)
		sum += raw_syscall2(110 /* getppid */, 0, 0);
	return sum;
}

__attribute__((noinline)) void slow_call_site(void)
{
	struct timespec ts = { 0, 20 * 1000 * 1000 };
	raw_syscall2(35 /* nanosleep */, (long)&ts, 0);
	__asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000;
	char go;
	if (read(0, &go, 1) != 1)
		return 1;
	long sum = count_site(n);
	slow_call_site();
	printf("done %ld\n", sum != 0);
	fflush(stdout);
	/* Stay alive (maps readable for symbolization) until stdin closes. */
	while (read(0, &go, 1) > 0)
		;
	return 0;
}
