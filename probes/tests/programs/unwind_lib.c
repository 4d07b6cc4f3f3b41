/* The shared library of unwind_chain.c's "lib" path, built without frame
 * pointers. */
extern volatile unsigned long sink;

__attribute__((noinline)) void lib_leaf(unsigned long n)
{
	unsigned long x = sink;
	for (unsigned long i = 0; i < n; i++)
		x = x * 2862933555777941757UL + 3037000493UL;
	sink = x;
}

__attribute__((noinline)) void lib_middle(unsigned long n)
{
	lib_leaf(n);
	__asm__ volatile("" ::: "memory");
}
